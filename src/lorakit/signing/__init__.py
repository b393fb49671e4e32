"""Signed adapters: an OpenSSF model-signing signature over every file of an adapter folder.

    sign_adapter("runs/reverse", "signer.pem", creator="ana")      # writes lorakit_card.json, then model.sig
    result = verify_adapter("runs/reverse", ["signer.pub.pem"])    # Verification, or SignatureError naming the change
    result.key, result.card["adapter"]["digest"]

`model.sig` is a Sigstore bundle written by the `model-signing` library (sigstore/model-transparency), so
its own CLI (`model_signing verify key DIR --signature DIR/model.sig --public_key P`) verifies what lorakit
signs and lorakit verifies what it signs. lorakit adds the card (card.py), whose hash the manifest covers,
and error messages that say which file changed and how (verify.py). docs/signing.md has the details.
"""

from lorakit.signing.card import CARD_NAME, build_card, write_card
from lorakit.signing.sign import SIGNATURE_NAME, sign_adapter
from lorakit.signing.verify import Verification, verify_adapter

__all__ = ["CARD_NAME", "SIGNATURE_NAME", "Verification", "build_card", "sign_adapter", "verify_adapter", "write_card"]
