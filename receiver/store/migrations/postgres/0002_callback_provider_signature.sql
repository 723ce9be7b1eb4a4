-- Whether a callback's provider signature (Replicate's, fal's) was verified:
-- 'verified', 'unchecked' (the provider signs but no secret was configured),
-- or NULL for providers that do not sign their callbacks. (SQLite's 0002.)
ALTER TABLE callbacks ADD COLUMN provider_signature text;
