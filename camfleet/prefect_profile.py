"""The `camfleet` Prefect profile: the plain Prefect CLI finds the stack `camfleet up` runs.

`camfleet up` saves a profile named `camfleet` with the stack's PREFECT_API_URL in the
user's Prefect profiles (PREFECT_HOME/profiles.toml) and makes it the active one, so
`prefect deployment run ...` or `prefect flow-run ls` in another terminal talk to the
stack's server with nothing exported. On stop the profile that was active before is
made active again (the `camfleet` profile stays, pointing at the stopped server).
"""

from __future__ import annotations

PROFILE = "camfleet"


def activate(api_url: str) -> str | None:
    """Save and activate the profile; returns the name of the profile active before."""
    from prefect.settings import PREFECT_API_URL
    from prefect.settings.profiles import Profile, load_profiles, save_profiles

    profiles = load_profiles()
    previous = profiles.active_name
    if PROFILE in profiles:
        profiles.update_profile(PROFILE, {PREFECT_API_URL: api_url})
    else:
        profiles.add_profile(Profile(name=PROFILE, settings={PREFECT_API_URL: api_url}))
    profiles.set_active(PROFILE)
    save_profiles(profiles)
    return previous if previous != PROFILE else None


def restore(previous: str | None) -> None:
    """Reactivate the profile active before `activate`, unless the user switched since."""
    from prefect.settings.profiles import load_profiles, save_profiles

    profiles = load_profiles()
    if profiles.active_name != PROFILE:
        return
    if previous and previous in profiles:
        profiles.set_active(previous)
        save_profiles(profiles)
