from __future__ import annotations

import time

import pytest
import standardwebhooks
import svix.webhooks

from receiver.clock import FakeClock
from receiver.config import new_webhook_secret
from receiver.delivery.signing import sign, webhook_headers
from receiver.store.base import Subscription

BODY = b'{"type":"task.succeeded","timestamp":"2026-11-21T08:00:00.000Z","data":{"id":"tsk_1"}}'


def test_the_specifications_test_vector() -> None:
    signature = sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}', "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(
    "verifier",
    [
        pytest.param(standardwebhooks.Webhook, id="standardwebhooks"),
        pytest.param(svix.webhooks.Webhook, id="svix"),
    ],
)
def test_both_libraries_verify_our_headers(verifier) -> None:
    secret = new_webhook_secret()
    headers = webhook_headers("evt_01", BODY, [secret], now=time.time())
    assert headers["webhook-id"] == "evt_01" and headers["content-type"] == "application/json"
    verifier(secret).verify(BODY, headers)
    with pytest.raises(Exception, match="signature"):
        verifier(new_webhook_secret()).verify(BODY, headers)
    with pytest.raises(Exception, match="signature"):
        verifier(secret).verify(BODY.replace(b"tsk_1", b"tsk_2"), headers)


def test_each_attempt_has_its_own_timestamp_and_the_same_id() -> None:
    secret = new_webhook_secret()
    first = webhook_headers("evt_01", BODY, [secret], now=1_790_000_000.9)
    retry = webhook_headers("evt_01", BODY, [secret], now=1_790_000_300.2)
    assert first["webhook-id"] == retry["webhook-id"] == "evt_01"
    assert (first["webhook-timestamp"], retry["webhook-timestamp"]) == ("1790000000", "1790000300")
    assert first["webhook-signature"] != retry["webhook-signature"]


@pytest.mark.parametrize(
    "verifier",
    [
        pytest.param(standardwebhooks.Webhook, id="standardwebhooks"),
        pytest.param(svix.webhooks.Webhook, id="svix"),
    ],
)
def test_a_rotation_signs_with_both_secrets_for_24_hours(verifier) -> None:
    clock = FakeClock(time.time())
    old, new = new_webhook_secret(), new_webhook_secret()
    sub = Subscription(
        id="sub_1", url="https://example.com/hook", events=("*",), secret=new, created_at=clock(),
        updated_at=clock(), previous_secret=old, previous_secret_expires_at=clock() + 86400,
    )
    during = webhook_headers("evt_01", BODY, sub.signing_secrets(clock()), now=clock())
    assert len(during["webhook-signature"].split(" ")) == 2
    verifier(old).verify(BODY, during)  # subscribers not yet switched
    verifier(new).verify(BODY, during)  # subscribers already switched

    clock.advance(86400)
    assert sub.signing_secrets(clock()) == (new,)
    after = webhook_headers("evt_01", BODY, sub.signing_secrets(clock()), now=clock())
    assert len(after["webhook-signature"].split(" ")) == 1
    assert after["webhook-signature"] == sign("evt_01", int(clock()), BODY, new)
    assert sign("evt_01", int(clock()), BODY, old) not in after["webhook-signature"]


def test_a_secret_is_required() -> None:
    with pytest.raises(ValueError):
        webhook_headers("evt_01", BODY, [], now=0)
