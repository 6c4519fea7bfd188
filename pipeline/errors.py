"""Error types whose class decides the process exit code and the message prefix.

Exit code 2 is bad input; exit code 1 is evidence that falls short. Each kind of
shortfall has its own type and prefix, so a log line says at once whether the
model failed its policy, a certificate was unsound, the ONNX file disagrees with
the evaluated model, a file was tampered with, or the registry could not be read.
"""


class UsageError(Exception):
    """Bad input (params, data, model, policy): one line for the user, exit code 2."""


class EvidenceError(Exception):
    """The evidence falls short: exit code 1. Subclasses name the kind of shortfall."""

    prefix = "FAILED"


class GateFailed(EvidenceError):
    """A blocking requirement of the release policy is not met."""

    prefix = "GATE FAILED"


class SoundnessViolation(EvidenceError):
    """A certificate contradicts an attack or a probed point: the certifier cannot be trusted."""

    prefix = "SOUNDNESS VIOLATION"


class ParityFailure(EvidenceError):
    """The ONNX file does not behave like the evaluated model."""

    prefix = "ONNX PARITY"


class IntegrityMismatch(EvidenceError):
    """A file differs from the hash the evidence pinned, or a verdict does not follow from the metrics."""

    prefix = "INTEGRITY MISMATCH"


class RegistryUnreachable(EvidenceError):
    """The model registry could not be reached or refused the request; nothing was read or moved."""

    prefix = "REGISTRY UNREACHABLE"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters (third-party errors run
    to pages; one line goes to the user), or its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
