"""Apps that ship with wirehub, built on the public framework API like any user's app."""
