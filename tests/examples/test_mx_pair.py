# Two servers: a primary that refuses at the banner and a secondary. Shown in docs/pytest.md.
import smtplib

import pytest


def send_with_failover(hosts, rcpt):
    """The code under test: try each MX in order, as an MTA does."""
    for host, port in hosts:
        try:
            with smtplib.SMTP(host, port, local_hostname="app.test", timeout=5) as smtp:
                smtp.sendmail("app@example.test", [rcpt], b"Subject: x\r\n\r\nx\r\n")
                return host
        except smtplib.SMTPConnectError:
            continue
    raise RuntimeError("no MX took the message")


def test_failover_to_the_secondary_mx(harness_factory):
    primary = harness_factory("service-unavailable")    # 421 4.3.2 at the banner
    secondary = harness_factory(host="127.0.0.2")        # accepts everything

    used = send_with_failover([(primary.host, primary.port),
                               (secondary.host, secondary.port)], "user@lab.test")

    assert used == "127.0.0.2"
    assert secondary.wait_for_message(rcpt="user@lab.test")
    primary.wait_idle()
    [refused] = primary.sessions()
    assert refused.end_reason.startswith("closed after 421")


@pytest.mark.scenario("message-too-large")
def test_async_code_can_use_it_too(smtp_harness):
    import asyncio

    import aiosmtplib

    async def send_big():  # asyncio code under test; the harness runs its own loop
        await aiosmtplib.send(b"Subject: big\r\n\r\n" + b"x" * 200_000,
                              sender="app@example.test", recipients=["user@lab.test"],
                              hostname=smtp_harness.host, port=smtp_harness.port,
                              local_hostname="app.test", start_tls=False)

    with pytest.raises(aiosmtplib.SMTPResponseException) as e:
        asyncio.run(send_big())
    assert e.value.code == 552
