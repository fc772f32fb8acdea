-- Token-bound command streams close when their credential dies (issue 13, item 13).
--
-- Any change of a device's token, revocation or status is announced on the
-- `camfleet_device_credentials` channel (payload: the device id), whoever made it (the
-- API on any instance, `camfleet devices revoke|rotate`, plain SQL); each API instance
-- re-checks its open streams of that device and closes those whose token is no longer
-- the device's live one.
CREATE FUNCTION camfleet_notify_device_credentials() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('camfleet_device_credentials', OLD.device_id);
    ELSIF NEW.device_token_hash IS DISTINCT FROM OLD.device_token_hash
          OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at
          OR NEW.status IS DISTINCT FROM OLD.status
          OR NEW.user_id IS DISTINCT FROM OLD.user_id THEN
        PERFORM pg_notify('camfleet_device_credentials', NEW.device_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER devices_credentials_notify
    AFTER UPDATE OR DELETE ON devices
    FOR EACH ROW
    EXECUTE FUNCTION camfleet_notify_device_credentials();
