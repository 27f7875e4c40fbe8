#!/usr/bin/python3
"""Self-test for test/notify_sink.py (stdlib only).

Run: /usr/bin/python3 test/notify_sink_selftest.py
Starts the sink on free ports and checks it with smtplib, raw SMTP sockets, urllib
and (when installed) the curl command line, whose libcurl is what sync uses.
Exits non-zero on the first failure.
"""

import email
import email.message
import email.policy
import http.client
import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = 0


def check(cond, what, *detail):
    global CHECKS
    CHECKS += 1
    if not cond:
        sys.stderr.write("FAIL: %s %s\n" % (what, " ".join(repr(d) for d in detail)))
        sys.exit(1)


class Sink:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "notify_sink.py"),
                                      "--smtp-port", "0", "--http-port", "0"] + list(args),
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        check(line.startswith("listening smtp="), "start line", line)
        parts = dict(p.split("=") for p in line.split()[1:])
        self.smtp_port = int(parts["smtp"])
        self.http_port = int(parts["http"])
        self.base = "http://127.0.0.1:%d" % self.http_port

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)

    def call(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def admin(self, method, path, body=None):
        status, _, payload = self.call(method, "/__admin/" + path, body)
        return status, json.loads(payload) if payload else None

    def messages(self, delivered=None):
        q = "" if delivered is None else "?delivered=%d" % delivered
        return self.admin("GET", "messages" + q)[1]

    def posts(self, delivered=None):
        q = "" if delivered is None else "?delivered=%d" % delivered
        return self.admin("GET", "posts" + q)[1]

    def smtp(self):
        return smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.test", timeout=30)


class Raw:
    """A hand-driven SMTP session, to check replies smtplib would hide."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.f = self.sock.makefile("rb")

    def read_reply(self):
        lines = []
        while True:
            line = self.f.readline().decode()
            check(line.endswith("\r\n"), "reply lines end with CRLF", line)
            lines.append(line[:-2])
            if len(line) < 4 or line[3] != "-":
                return int(lines[0][:3]), lines

    def cmd(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.read_reply()

    def close(self):
        self.sock.close()


def test_smtp_sequence(sink):
    r = Raw(sink.smtp_port)
    code, lines = r.read_reply()
    check(code == 220, "greeting 220", lines)
    check(r.cmd("MAIL FROM:<a@x.test>")[0] == 503, "MAIL before EHLO is 503")
    code, lines = r.cmd("EHLO client.test")
    check(code == 250 and len(lines) > 1, "EHLO multi-line 250", lines)
    keywords = [l[4:].split()[0] for l in lines[1:]]
    check("8BITMIME" in keywords and "SIZE" in keywords, "EHLO lists 8BITMIME and SIZE", keywords)
    check("STARTTLS" not in keywords and "AUTH" not in keywords, "no STARTTLS/AUTH unless asked", keywords)
    check(all(l[3] == "-" for l in lines[:-1]) and lines[-1][3] == " ", "multi-line reply format", lines)
    check(r.cmd("RCPT TO:<b@x.test>")[0] == 503, "RCPT before MAIL is 503")
    check(r.cmd("DATA")[0] == 503, "DATA before MAIL is 503")
    check(r.cmd("MAIL FROM:a@x.test")[0] == 501, "MAIL without angle brackets is 501")
    check(r.cmd("MAIL FROM:<a@x.test> FOO=1")[0] == 555, "unknown MAIL parameter is 555")
    check(r.cmd("MAIL FROM:<a@x.test> SIZE=999999999999")[0] == 552, "SIZE over the limit is 552")
    check(r.cmd("MAIL FROM:<a@x.test> BODY=8BITMIME")[0] == 250, "MAIL is 250")
    check(r.cmd("MAIL FROM:<a@x.test>")[0] == 503, "nested MAIL is 503")
    check(r.cmd("DATA")[0] == 503, "DATA before RCPT is 503")
    check(r.cmd("RCPT TO:<not an address>")[0] == 501, "malformed RCPT is 501")
    check(r.cmd("RCPT TO:<nobody>")[0] == 553, "RCPT without a domain is 553")
    check(r.cmd("RCPT TO:<b@x.test>")[0] == 250, "RCPT is 250")
    check(r.cmd("NOOP")[0] == 250, "NOOP is 250")
    check(r.cmd("RSET")[0] == 250, "RSET is 250")
    check(r.cmd("RCPT TO:<b@x.test>")[0] == 503, "RSET ended the transaction")
    check(r.cmd("STARTTLS")[0] == 502, "STARTTLS not offered is 502")
    check(r.cmd("FROB")[0] == 500, "unknown command is 500")
    check(r.cmd("X" * 600)[0] == 500, "command line over 512 octets is 500")
    check(r.cmd("VRFY someone")[0] == 252, "VRFY is 252")
    # a full transaction by hand, pipelined, with stuffed dots and a lone-dot line
    r.sock.sendall(b"MAIL FROM:<>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n")
    check(r.read_reply()[0] == 250 and r.read_reply()[0] == 250, "pipelined MAIL/RCPT")
    check(r.read_reply()[0] == 354, "DATA is 354")
    r.sock.sendall(b"Subject: raw\r\n\r\n..one\r\n..\r\n...\r\nlast\r\n.\r\n")
    code, lines = r.read_reply()
    check(code == 250, "end of data is 250", lines)
    check(r.cmd("QUIT")[0] == 221, "QUIT is 221")
    r.close()
    m = sink.messages()[-1]
    check(m["from"] == "" and m["rcpts"] == ["c@x.test"], "null reverse path recorded", m)
    check(m["data"] == "Subject: raw\r\n\r\n.one\r\n.\r\n..\r\nlast\r\n", "dot-unstuffing", m["data"])
    check(m["helo"] == "client.test" and m["delivered"] and m["reply"] == 250, "raw message recorded", m)


def test_smtplib(sink):
    msg = email.message.EmailMessage()
    msg["From"] = "sync@sender.test"
    msg["To"] = "ops@example.com, oncall@example.org"
    msg["Subject"] = "[sync] acme.Contact: backfill completed (3 records)"
    msg["Message-ID"] = "<sync-7@host>"
    msg["X-Sync-Delivery"] = "7"
    body = "first line\n.starts with a dot\n.\n..two dots\nunicode: caf\u00e9\n"
    msg.set_content(body)
    with sink.smtp() as s:
        refused = s.send_message(msg, from_addr="sync@sender.test",
                                 to_addrs=["ops@example.com", "oncall@example.org", "third@example.net"])
        check(refused == {}, "no recipient refused", refused)
    ms = sink.messages(delivered=1)
    m = ms[-1]
    check(m["from"] == "sync@sender.test", "envelope from", m["from"])
    check(m["rcpts"] == ["ops@example.com", "oncall@example.org", "third@example.net"], "all recipients", m["rcpts"])
    check(m["headers"]["subject"] == msg["Subject"], "subject header", m["headers"])
    check(m["headers"]["message-id"] == "<sync-7@host>" and m["headers"]["x-sync-delivery"] == "7",
          "Message-ID and X-Sync-Delivery", m["headers"])
    parsed = email.message_from_bytes(m["data"].encode("utf-8"), policy=email.policy.default)
    check(parsed.get_content().replace("\r\n", "\n") == body, "body survives dot-stuffing", parsed.get_content(), body)
    # smtplib sends 8-bit text without BODY=8BITMIME (RFC 6152): the sink notices
    check(m["violations"] == ["8-bit data without BODY=8BITMIME"], "8-bit violation listed", m["violations"])
    check(isinstance(m["t"], float) and abs(m["t"] - time.time()) < 60, "t is a time", m["t"])

    # two messages in one session, RSET between
    with sink.smtp() as s:
        s.sendmail("a@x.test", ["b@x.test"], "Subject: one\r\n\r\n.\r\n")
        s.rset()
        s.sendmail("a@x.test", ["c@x.test", "d@x.test"], "Subject: two\r\n\r\nbody\r\n")
    ms = sink.messages(delivered=1)
    check([m["headers"]["subject"] for m in ms[-2:]] == ["one", "two"], "two messages in a session")
    check(ms[-2]["body"] == ".\r\n", "a lone dot line in the body", ms[-2]["body"])
    check(ms[-1]["rcpts"] == ["c@x.test", "d@x.test"], "second message's recipients")


def test_smtp_faults(sink):
    sink.admin("DELETE", "messages")
    st, res = sink.admin("POST", "faults", {"target": "smtp", "count": 2, "smtp_code": 451})
    check(st == 201, "fault accepted", st, res)
    for i in range(2):
        try:
            with sink.smtp() as s:
                s.sendmail("a@x.test", ["b@x.test"], "Subject: f%d\r\n\r\nx\r\n" % i)
            check(False, "451 fault must fail the delivery")
        except smtplib.SMTPDataError as e:
            check(e.smtp_code == 451, "451 at the end of data", e.smtp_code)
    with sink.smtp() as s:
        s.sendmail("a@x.test", ["b@x.test"], "Subject: ok\r\n\r\nx\r\n")
    ms = sink.messages()
    check([m["delivered"] for m in ms] == [False, False, True], "two failed then one delivered", ms)
    check(ms[0]["reply"] == 451 and ms[0]["fault"]["smtp_code"] == 451, "fault recorded", ms[0])
    check(ms[0]["headers"]["subject"] == "f0", "failed attempt keeps its data", ms[0]["headers"])
    check(len(sink.messages(delivered=1)) == 1 and len(sink.messages(delivered=0)) == 2, "delivered filter")

    # drop: the connection closes after the data without a reply
    sink.admin("POST", "faults", {"target": "smtp", "drop": True})
    try:
        with sink.smtp() as s:
            s.sendmail("a@x.test", ["b@x.test"], "Subject: drop\r\n\r\nx\r\n")
        check(False, "drop must fail the delivery")
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        pass
    ms = sink.messages()
    check(ms[-1]["delivered"] is False and ms[-1]["reply"] is None and ms[-1]["fault"]["drop"], "drop recorded", ms[-1])

    # a refused greeting, and a rejected RCPT
    sink.admin("POST", "faults", {"target": "smtp", "smtp_code": 421, "stage": "connect"})
    try:
        sink.smtp()
        check(False, "421 greeting must refuse")
    except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected) as e:
        check(getattr(e, "smtp_code", 421) == 421, "421 greeting", e)
    sink.admin("POST", "faults", {"target": "smtp", "smtp_code": 550, "stage": "rcpt"})
    with sink.smtp() as s:
        refused = s.sendmail("a@x.test", ["bad@x.test", "good@x.test"], "Subject: rc\r\n\r\nx\r\n")
    check(list(refused) == ["bad@x.test"] and refused["bad@x.test"][0] == 550, "550 for one RCPT", refused)
    check(sink.messages()[-1]["rcpts"] == ["good@x.test"], "accepted recipient only")

    # a delay alone answers normally, late, and counts as in flight meanwhile
    sink.admin("POST", "faults", {"target": "smtp", "delay": 1.0})
    t0 = time.time()
    with sink.smtp() as s:
        s.sendmail("a@x.test", ["b@x.test"], "Subject: slow\r\n\r\nx\r\n")
    check(time.time() - t0 >= 0.9, "delay fault delays")
    check(sink.messages()[-1]["delivered"], "delayed delivery is delivered")
    _, faults = sink.admin("GET", "faults")
    check(all(f["remaining"] == 0 for f in faults), "every fault used", faults)
    check(sink.admin("POST", "faults", {"target": "smtp", "smtp_code": 250})[0] == 400, "bad fault code is 400")
    check(sink.admin("POST", "faults", {"target": "mail"})[0] == 400, "bad fault target is 400")
    st, res = sink.admin("DELETE", "messages")
    check(st == 200 and res["cleared"] >= 5 and sink.messages() == [], "DELETE messages")


def test_smtp_auth():
    sink = Sink("--smtp-auth", "user:secret")
    try:
        with sink.smtp() as s:
            try:
                s.sendmail("a@x.test", ["b@x.test"], "Subject: x\r\n\r\nx\r\n")
                check(False, "MAIL without AUTH must be refused")
            except smtplib.SMTPSenderRefused as e:
                check(e.smtp_code == 530, "530 without AUTH", e.smtp_code)
        with sink.smtp() as s:
            try:
                s.login("user", "wrong")
                check(False, "bad password must fail")
            except smtplib.SMTPAuthenticationError as e:
                check(e.smtp_code == 535, "535 for a bad password", e.smtp_code)
        for mech in ("PLAIN", "LOGIN"):
            with sink.smtp() as s:
                s.ehlo()
                s.user, s.password = "user", "secret"
                code, _ = s.auth(mech, getattr(s, "auth_" + mech.lower()), initial_response_ok=(mech == "PLAIN"))
                check(code == 235, "AUTH %s" % mech, code)
                s.sendmail("a@x.test", ["b@x.test"], "Subject: auth\r\n\r\nx\r\n")
        ms = sink.messages(delivered=1)
        check(len(ms) == 2 and all(m["auth_user"] == "user" for m in ms), "auth_user recorded", ms)
    finally:
        sink.stop()


def test_curl(sink):
    """libcurl, as sync uses it: MAIL/RCPT/DATA from a read callback, dots escaped by curl."""
    curl = shutil.which("curl")
    if not curl:
        print("notify_sink_selftest: curl not installed, libcurl check skipped")
        return
    sink.admin("DELETE", "messages")
    text = "Subject: curl\r\nX-Sync-Delivery: 9\r\n\r\n.dot first\r\n.\r\nend\r\n"
    with tempfile.NamedTemporaryFile("w", suffix=".eml", delete=False) as f:
        f.write(text)
    try:
        out = subprocess.run([curl, "-sS", "smtp://127.0.0.1:%d" % sink.smtp_port, "--mail-from", "s@x.test",
                              "--mail-rcpt", "a@x.test", "--mail-rcpt", "b@y.test", "--upload-file", f.name],
                             capture_output=True, text=True, timeout=30)
        check(out.returncode == 0, "curl sends", out.stderr)
        sink.admin("POST", "faults", {"target": "smtp", "smtp_code": 451})
        out = subprocess.run([curl, "-sS", "smtp://127.0.0.1:%d" % sink.smtp_port, "--mail-from", "s@x.test",
                              "--mail-rcpt", "a@x.test", "--upload-file", f.name],
                             capture_output=True, text=True, timeout=30)
        check(out.returncode != 0, "curl sees the 451", out.returncode)
    finally:
        os.unlink(f.name)
    ms = sink.messages()
    check(len(ms) == 2 and ms[0]["delivered"] and not ms[1]["delivered"], "curl: one delivered, one failed", ms)
    check(ms[0]["data"] == text and ms[0]["rcpts"] == ["a@x.test", "b@y.test"], "curl message intact", ms[0])
    check(ms[0]["violations"] == [], "curl speaks clean SMTP", ms[0]["violations"])


def test_webhook(sink):
    body = json.dumps({"id": 1, "event": "backfill_completed", "data": {"records": 3}}).encode()
    st, hdrs, payload = sink.call("POST", "/hooks/sync?x=1", raw=body,
                                  headers={"X-Sync-Event": "backfill_completed", "X-Sync-Delivery": "1"})
    check(st == 200 and json.loads(payload)["ok"] is True, "webhook answered 200", st, payload)
    posts = sink.posts()
    p = posts[-1]
    check(p["path"] == "/hooks/sync" and p["query"] == "x=1" and p["method"] == "POST", "path recorded", p)
    check(p["headers"]["x-sync-event"] == "backfill_completed" and p["headers"]["x-sync-delivery"] == "1",
          "headers recorded (lower-case names)", p["headers"])
    check(p["body"] == body.decode() and p["json"]["data"]["records"] == 3, "body recorded", p)
    check(p["delivered"] is True and p["status"] == 200 and p["fault"] is None, "delivered", p)

    # keep-alive: two requests on one connection
    conn = http.client.HTTPConnection("127.0.0.1", sink.http_port, timeout=30)
    for i in range(2):
        conn.request("POST", "/k", body=b'{"n": %d}' % i, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        check(r.status == 200, "keep-alive request %d" % i)
    # chunked body
    conn.putrequest("POST", "/chunked")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n")
    r = conn.getresponse()
    r.read()
    check(r.status == 200 and sink.posts()[-1]["json"] == {"a": 1}, "chunked body")
    conn.close()

    sink.admin("DELETE", "posts")
    sink.admin("POST", "faults", {"target": "webhook", "count": 2, "http_status": 500})
    for i in range(2):
        st, _, _ = sink.call("POST", "/hooks/sync", raw=b'{"try": %d}' % i)
        check(st == 500, "fault answers 500", st)
    st, _, _ = sink.call("POST", "/hooks/sync", raw=b'{"try": 2}')
    check(st == 200, "after the faults: 200", st)
    posts = sink.posts()
    check([(p["delivered"], p["status"]) for p in posts] == [(False, 500), (False, 500), (True, 200)],
          "failed attempts are recorded as such", posts)
    check(len(sink.posts(delivered=1)) == 1 and len(sink.posts(delivered=0)) == 2, "delivered filter")

    sink.admin("POST", "faults", {"target": "webhook", "drop": True})
    try:
        sink.call("POST", "/hooks/sync", raw=b'{"try": 3}')
        check(False, "drop must fail the request")
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        pass
    p = sink.posts()[-1]
    check(p["delivered"] is False and p["status"] is None and p["fault"]["drop"], "drop recorded", p)

    sink.admin("POST", "faults", {"target": "webhook", "path_regex": "^/other", "http_status": 503})
    check(sink.call("POST", "/hooks/sync", raw=b"{}")[0] == 200, "path_regex spares other paths")
    check(sink.call("POST", "/other/x", raw=b"{}")[0] == 503, "path_regex hits its path")

    # a delay-only fault: in flight while it waits, then 200
    import threading
    sink.admin("POST", "faults", {"target": "webhook", "delay": 1.5})
    result = {}
    t = threading.Thread(target=lambda: result.update(st=sink.call("POST", "/slow", raw=b"{}")[0]))
    t.start()
    seen = 0
    deadline = time.time() + 5
    while time.time() < deadline and not seen:
        seen = sink.admin("GET", "stats")[1]["webhook_inflight"]
        time.sleep(0.05)
    t.join(10)
    check(seen == 1 and result.get("st") == 200, "in-flight counted, then answered", seen, result)
    check(sink.admin("GET", "stats")[1]["webhook_inflight"] == 0, "nothing in flight afterwards")

    st, res = sink.admin("DELETE", "faults")
    check(st == 200, "DELETE faults")
    st, res = sink.admin("DELETE", "posts")
    check(st == 200 and sink.posts() == [], "DELETE posts")
    st, stats = sink.admin("GET", "stats")
    check(stats["posts"] == 0 and stats["messages"] == len(sink.messages()), "stats after clearing", stats)
    check(sink.admin("GET", "nothing")[0] == 404, "unknown admin endpoint is 404")
    check("faults" in sink.admin("GET", "")[1]["help"], "admin help")


def main():
    sink = Sink()
    try:
        test_smtp_sequence(sink)
        test_smtplib(sink)
        test_smtp_faults(sink)
        test_curl(sink)
        test_webhook(sink)
    finally:
        sink.stop()
    test_smtp_auth()
    print("notify_sink_selftest: %d checks passed" % CHECKS)


if __name__ == "__main__":
    main()
