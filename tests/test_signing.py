from __future__ import annotations

import pytest

from receiver.clock import FakeClock
from receiver.errors import CallbackExpired, InvalidSignature
from receiver.signing import CallbackSigner, TokenSigner


def test_round_trip_names_the_task() -> None:
    signer = CallbackSigner(["k1"])
    token = signer.mint("tsk_abc", max_age=60)
    assert signer.verify(token) == "tsk_abc"
    assert "/" not in token and "+" not in token  # URL-safe


@pytest.mark.parametrize(
    "tamper",
    [
        # The middle of the signature: its last base64 character may carry unused bits.
        pytest.param(lambda t: t[:-10] + ("A" if t[-10] != "A" else "B") + t[-9:], id="signature-changed"),
        pytest.param(lambda t: "x" + t[1:], id="payload-changed"),
        pytest.param(lambda t: t.split(".")[0], id="signature-removed"),
        pytest.param(lambda t: "", id="empty"),
        pytest.param(lambda t: "not-a-token", id="garbage"),
        # Characters outside the alphabet were skipped, so one token had many spellings.
        pytest.param(lambda t: t[:-10] + "!!" + t[-10:], id="signature-with-foreign-characters"),
        pytest.param(lambda t: t[:-10] + "==" + t[-10:], id="signature-with-padding-inside"),
    ],
)
def test_tampered_tokens_are_refused(tamper) -> None:
    signer = CallbackSigner(["k1"])
    token = signer.mint("tsk_abc", max_age=60)
    with pytest.raises(InvalidSignature):
        signer.verify(tamper(token))


def test_a_token_has_one_spelling() -> None:
    """The signature's last character carries 2 unused bits: its 3 other spellings are refused."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    signer = CallbackSigner(["k1"])
    token = signer.mint("tsk_abc", max_age=60)
    last = alphabet.index(token[-1])
    spellings = [token[:-1] + alphabet[(last & ~3) | bits] for bits in range(4)]
    assert token in spellings
    for other in spellings:
        if other != token:
            with pytest.raises(InvalidSignature):
                signer.verify(other)
    assert signer.verify(token) == "tsk_abc"


def test_expiry_follows_the_injected_clock() -> None:
    clock = FakeClock(1_800_000_000)
    signer = CallbackSigner(["k1"], clock=clock)
    token = signer.mint("tsk_abc", max_age=3600)
    clock.advance(3600)
    assert signer.verify(token) == "tsk_abc"
    clock.advance(1)
    with pytest.raises(CallbackExpired) as caught:
        signer.verify(token)
    assert caught.value.status_code == 410


def test_each_token_carries_its_own_max_age() -> None:
    clock = FakeClock(1_800_000_000)
    signer = CallbackSigner(["k1"], clock=clock)
    short, long = signer.mint("tsk_a", max_age=60), signer.mint("tsk_b", max_age=7200)
    clock.advance(120)
    with pytest.raises(CallbackExpired):
        signer.verify(short)
    assert signer.verify(long) == "tsk_b"


def test_key_rotation_keeps_old_urls_working() -> None:
    old = CallbackSigner(["old"])
    token = old.mint("tsk_abc", max_age=60)
    rotated = CallbackSigner(["new", "old"])  # the first key signs, all verify
    assert rotated.verify(token) == "tsk_abc"
    fresh = rotated.mint("tsk_def", max_age=60)
    assert CallbackSigner(["new"]).verify(fresh) == "tsk_def"
    with pytest.raises(InvalidSignature):
        old.verify(fresh)  # minted with the new key
    with pytest.raises(InvalidSignature):
        CallbackSigner(["new"]).verify(token)  # the old key was retired


def test_a_wrong_key_is_refused() -> None:
    token = CallbackSigner(["k1"]).mint("tsk_abc", max_age=60)
    with pytest.raises(InvalidSignature):
        CallbackSigner(["k2"]).verify(token)


def test_salts_separate_purposes() -> None:
    callback_token = CallbackSigner(["k1"]).mint("tsk_abc", max_age=60)
    with pytest.raises(InvalidSignature):
        TokenSigner(["k1"], salt="receiver.asset.v1").verify(callback_token)


def test_tokens_use_sha256() -> None:
    token = CallbackSigner(["k1"]).mint("tsk_abc", max_age=60)
    signature = token.rsplit(".", 1)[1]
    assert len(signature) == 43  # base64 of 32 bytes: SHA-256, not itsdangerous's SHA-1 default


def test_keys_are_required() -> None:
    with pytest.raises(ValueError):
        CallbackSigner([])
    with pytest.raises(ValueError):
        CallbackSigner([""])


def test_tokens_can_carry_a_scope() -> None:
    signer = CallbackSigner(["k1"])
    scoped = signer.open(signer.mint("tsk_abc", max_age=60, scope="kling"))
    assert (scoped.subject, scoped.scope) == ("tsk_abc", "kling")
    unscoped = signer.open(signer.mint("tsk_abc", max_age=60))
    assert (unscoped.subject, unscoped.scope) == ("tsk_abc", None)
    assert signer.verify(signer.mint("tsk_abc", max_age=60, scope="kling")) == "tsk_abc"


def _itsdangerous_verdict(signer: CallbackSigner, token: str) -> object:
    """What itsdangerous itself makes of a token (the reference the fast check must agree with)."""
    from itsdangerous import BadData

    try:
        return signer._serializer.loads(token)
    except BadData:
        return "refused"


def _fast_verdict(signer: CallbackSigner, token: str) -> object:
    try:
        claims = signer.open(token)
    except InvalidSignature:
        return "refused"
    return [claims.subject, 60, claims.scope] if claims.scope else [claims.subject, 60]


@pytest.mark.parametrize("keys", [["k1"], ["new", "old"], ["old"]], ids=["one-key", "rotated", "retired"])
def test_verification_agrees_with_itsdangerous(keys: list[str]) -> None:
    import random

    rng = random.Random(7)
    minted = [CallbackSigner(["old"]).mint(f"tsk_{i}", max_age=60, scope="kling") for i in range(20)]
    minted += [CallbackSigner(["new"]).mint(f"tsk_n{i}", max_age=60) for i in range(20)]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=é "
    candidates = list(minted)
    for token in minted:
        for _ in range(10):
            chars = list(token)
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            candidates.append("".join(chars))
        candidates.append(token[: rng.randrange(len(token))])
        candidates.append(token + rng.choice(alphabet))
    signer = CallbackSigner(keys)
    for token in candidates:
        assert _fast_verdict(signer, token) == _itsdangerous_verdict(signer, token), token
