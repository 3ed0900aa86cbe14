"""Example plugins shipped with flowrun, one sub-package per example flow."""
