-- A clinic's page of `GET /v1/pumps` (services/api/sql.py, LIST_CLINIC_PUMPS) is its pumps by
-- serial after the cursor: with this index it reads the page's rows and stops, whatever the
-- size of the clinic or the fleet. It serves every lookup by clinic the old one did.
CREATE INDEX pumps_clinic_serial ON pumps (clinic_id, serial);
DROP INDEX pumps_clinic_id;
