-- Node certificates renew themselves: the certificate the current one renewed stays admitted
-- (an agent may have lost the new one before saving it) until the next renewal or a re-join,
-- and the current one's expiry is kept for `describe node`.
ALTER TABLE nodes ADD COLUMN prev_cert_sha256 TEXT;
ALTER TABLE nodes ADD COLUMN cert_not_after_ms BIGINT;
