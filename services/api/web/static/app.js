// Print buttons (the patient report): the browser's print dialog, with the print stylesheet.
(function () {
  var buttons = document.querySelectorAll("[data-print]");
  for (var i = 0; i < buttons.length; i++) {
    buttons[i].addEventListener("click", function () { window.print(); });
  }
})();
// Refresh the worklist in place every 30 s (no full reload).
(function () {
  var box = document.getElementById("worklist");
  if (!box) return;
  var url = box.getAttribute("data-refresh");
  function refresh() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { if (r.status === 401) { window.location = "/login"; return null; } return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null && html !== undefined) { box.innerHTML = html; } })
      .catch(function () { /* keep the last view; try again next time */ });
  }
  setInterval(refresh, 30000);
})();
