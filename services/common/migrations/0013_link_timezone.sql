-- The user's timezone (IANA) as the provider last reported it, e.g. in a Withings `getmeas`
-- answer. Answers that carry no timezone of their own (Withings intraday series) take their
-- samples' local offsets from it, so that the offsets, and with them the hourly aggregates,
-- do not depend on which other categories happened to be fetched in the same call.
ALTER TABLE provider_links ADD COLUMN timezone text;
