"""The `edge-lam` console entry points (`main`), the run-config check and the local
SuperLink's control. It imports the library; nothing in the library imports it."""
