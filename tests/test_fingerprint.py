from pipeline.admission.fingerprint import fingerprint, split

BODY = b"Buy cheap pills now!\r\nhttp://pills.example/\r\n"


def copy(to: str, msgid: str, extra_ws: bool = False) -> bytes:
    body = BODY.replace(b"now!", b"now!   ") if extra_ws else BODY
    return (f"Received: from x by y; {msgid}\r\nTo: {to}\r\nMessage-ID: <{msgid}@spam>\r\n"
            "Subject: Cheap  pills\r\n\r\n").encode() + body


def test_copies_of_a_campaign_share_a_fingerprint():
    assert fingerprint(copy("a@example.com", "1")) == fingerprint(copy("b@example.net", "2", extra_ws=True))


def test_different_body_or_subject_differs():
    other = copy("a@example.com", "1").replace(b"pills.example", b"other.example")
    assert fingerprint(copy("a@example.com", "1")) != fingerprint(other)
    assert fingerprint(copy("a@example.com", "1")) != fingerprint(copy("a@example.com", "1").replace(b"Cheap", b"Free"))


def test_garbage_never_raises():
    for raw in (b"", b"\x00\xff" * 100, b"Subject:", b"no header end", b"\n\n"):
        assert len(fingerprint(raw)) == 24
    assert split(b"a: b\n\nbody") == (b"a: b", b"body")
