-- Version 7: administrators (nimbusfs user add --admin): they see the whole
-- store's totals in GET /api/v1/storage/stats.
ALTER TABLE users ADD COLUMN admin boolean NOT NULL DEFAULT false;
