"""The run config: key declarations (`options`), sections, `RunConfig`, the one registry
mechanism for every plug-in kind, and the device-profile table (`hardware`)."""
