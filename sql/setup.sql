-- Shared by every test of the suite: the extension, and a reader that masks what changes
-- from run to run (xids, LSNs, timestamps) while keeping the record text, key order included.
SET client_min_messages = warning;
CREATE EXTENSION saiki;
CREATE FUNCTION changes(slot name, VARIADIC opts text[] DEFAULT '{}') RETURNS SETOF text
LANGUAGE sql AS $$
  SELECT regexp_replace(regexp_replace(regexp_replace(regexp_replace(data,
      '"xid":[0-9]+', '"xid":0', 'g'),
      '"(lsn|commit_lsn)":"[0-9A-F]+/[0-9A-F]+"', '"\1":"0/0"', 'g'),
      '"commit_ts":"[0-9T:.Z-]+"', '"commit_ts":"T"', 'g'),
      '"subxid":[0-9]+', '"subxid":1', 'g')
  FROM pg_logical_slot_get_changes(slot, NULL, NULL, VARIADIC opts)
$$;
