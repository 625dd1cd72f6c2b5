"""The controller's errors. A module of their own because every part of the controller
(controller_*.py) raises them, and callers catch them from cluster/control/controller.py,
which re-exports them."""
from __future__ import annotations


class ControllerError(RuntimeError):
    """The controller could not bring up or repair its groups; the message names the group."""


class GroupNotReadyError(ControllerError):
    """A group is restarting or its new address does not answer yet: transient, the next
    check_groups() tries again."""
