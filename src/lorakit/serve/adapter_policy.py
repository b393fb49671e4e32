"""Which adapters `lorakit serve` agrees to serve: the operator's trust policy, checked in one place for
start-up adapters (cli/serve.py) and runtime loads (app.py) alike.

    --registry PATH         adapters may be named by registry reference: `name` (latest) or `name@<digest prefix>`
    --require-signed        every adapter must verify (lorakit.signing.verify_adapter) with a --trusted-key,
                            signed for the base model this server runs
    --trusted-key PUB.pem   a public key signatures are checked with (repeatable)
    --require-vetted        every adapter must come from the registry with a vet report whose verdict is "pass"

`admit(folder, entry, shown)` returns the adapter's `Trust` (what /v1/models shows: its version, signer, vet
verdict and card) or raises
`AdapterRefused` with a one-line reason that names the adapter as the caller named it (`shown`), never a
server-side path. `confirm` then checks that the engine loaded the very adapter that was verified (same
content digest), so a folder changed between the check and the load is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorakit.errors import ConfigError, LorakitError, SignatureError
from lorakit.registry import Entry, Registry, RegistryError

PASS = "pass"


class AdapterRefused(LorakitError):
    """The server's policy refuses this adapter; the message is one line without server paths."""


@dataclass(frozen=True)
class Trust:
    """What the server knows of one served adapter, as /v1/models shows it under "lorakit"."""

    registry: Optional[str] = None    # `name@<12 hex>` when it came from the registry
    signed_by: Optional[str] = None   # the trusted key's file name that verified it
    vetted: Optional[str] = None      # the registry's vet verdict ("pass", "unvetted", ...); None outside it
    digest: Optional[str] = None      # the content digest the policy checked (None: not checked)
    card: Optional[dict] = None       # its lorakit_card.json (signing/card.py's shown_card), None without one

    def to_json(self, digest: str) -> dict:
        return {"digest": digest, "registry": self.registry, "signed_by": self.signed_by, "vetted": self.vetted,
                "card": self.card}


@dataclass(frozen=True)
class AdapterPolicy:
    """The operator's rules; the defaults admit every adapter and verify nothing."""

    registry: Optional[Registry] = None
    trusted_keys: tuple[Path, ...] = ()
    require_signed: bool = False
    require_vetted: bool = False
    base_model: str = "embedded"  # the served base as verify_adapter takes it: a local folder or "embedded"

    def __post_init__(self) -> None:
        if self.require_signed and not self.trusted_keys:
            raise ConfigError("--require-signed needs at least one --trusted-key PUBLIC.pem to verify signatures with")
        for key in self.trusted_keys:
            if not Path(key).is_file():
                raise ConfigError(f"--trusted-key {key}: no such file")

    def admit(self, folder: Path, entry: Optional[Entry], shown: str) -> Trust:
        """The adapter's Trust if the policy allows serving it, else AdapterRefused naming the reason."""
        reference = entry.reference if entry is not None else None
        if self.require_vetted:
            verdict = entry.vetted if entry is not None else None
            if verdict is None:
                raise AdapterRefused(f"{shown}: refused: this server serves only vetted adapters (--require-vetted) "
                                     "and a folder outside the registry has no vet report; add it to the registry "
                                     "with a passing vet report")
            if verdict != PASS:
                raise AdapterRefused(f"{shown}: refused: this server serves only vetted adapters (--require-vetted) "
                                     f"and {reference} is {verdict!r}, not {PASS!r}")
        signed_by, digest = None, None
        if self.trusted_keys:
            try:
                from lorakit.signing import verify_adapter

                verified = verify_adapter(folder, self.trusted_keys, base_model=self.base_model)
            except SignatureError as exc:
                if self.require_signed:
                    raise AdapterRefused(f"{shown}: refused: this server serves only adapters signed by a trusted "
                                         f"key (--require-signed): {self._scrub(str(exc), folder, shown)}") from None
            else:
                signed_by, digest = verified.key.name, verified.adapter_digest
        from lorakit.signing.card import shown_card

        return Trust(reference, signed_by, entry.vetted if entry is not None else None, digest, shown_card(folder))

    @staticmethod
    def confirm(trust: Trust, loaded_digest: str) -> None:
        """AdapterRefused if the engine loaded other bytes than those verified (the folder changed meanwhile)."""
        if trust.digest is not None and trust.digest != loaded_digest:
            raise AdapterRefused("refused: the adapter changed between its signature check and its load")

    def _scrub(self, message: str, folder: Path, shown: str) -> str:
        """A verification message in the caller's terms: the folder as they named it, keys by file name, the
        base model by role; the first line only."""
        message = message.strip().splitlines()[0] if message.strip() else "verification failed"
        message = message.replace(f"{folder}: ", "").replace(str(folder), shown)
        for key in self.trusted_keys:
            message = message.replace(str(key), Path(key).name)
        if self.base_model != "embedded":
            message = message.replace(str(self.base_model), "the served base model")
        return message


def registry_version(registry: Registry, reference: str) -> tuple[Path, Entry]:
    """The verified, read-only folder of a registry reference and its entry; RegistryError if unknown,
    ambiguous or damaged (its message names the registry's location: scrub it before showing a caller)."""
    entry = registry.resolve(reference)
    return registry.get(entry.reference), entry


def scrub_registry_error(exc: RegistryError, registry: Optional[Registry]) -> str:
    """A RegistryError's message without the registry's location on the server."""
    message = str(exc)
    if registry is not None:
        message = message.replace(f" at {registry.storage.location}", "").replace(str(registry.storage.location),
                                                                                 "the registry")
    return message
