"""The one error type of a refused input, carrying the parameter it is about.

Every check raises :class:`InputError` (or a subclass) with ``field`` set to the parameter's name as the
caller spelled it (``prompt``, ``mask_image``, ``loras[1].scale``): the server answers it as
``{"field": ...}``, the command line names the option that sets it, a batch names ``requests[i]``. The
subclasses keep the built-in types a drop-in caller may catch (``TypeError``, ``FileNotFoundError``).
No torch here.
"""

from __future__ import annotations


class InputError(ValueError):
    """A value the caller gave is not allowed: ``field`` names it, the message says what is allowed."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def within(self, prefix: str) -> InputError:
        """The same error, its field placed under ``prefix`` (``requests[2]`` + ``prompt`` ->
        ``requests[2].prompt``), its message prefixed the same way."""
        field = prefix if self.field is None else f"{prefix}.{self.field}"
        return type(self)(f"{prefix}: {self.message}", field=field)


class InputTypeError(InputError, TypeError):
    """A value of a type the parameter does not take."""


class InputFileNotFound(InputError, FileNotFoundError):
    """A path the caller gave does not exist."""
