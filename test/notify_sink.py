#!/usr/bin/python3
"""Fake notification sink for the `sync` test suite (Python 3.11, stdlib only).

Run:  /usr/bin/python3 test/notify_sink.py --smtp-port 0 --http-port 0
      [--host 127.0.0.1] [--hostname sink.test] [--max-size BYTES]
      [--smtp-auth USER:PASS] [--verbose]
Prints "listening smtp=PORT http=PORT" (stdout, flushed) once both servers accept
connections. Binds 127.0.0.1 only by default.

Two receivers and one control API:

* SMTP (RFC 5321) on --smtp-port, written on socketserver (no smtpd/asyncore):
  greeting 220; EHLO (multi-line 250: 8BITMIME, SIZE, ENHANCEDSTATUSCODES, PIPELINING,
  HELP, and AUTH PLAIN LOGIN only with --smtp-auth; never STARTTLS, which is answered
  502 like any extension not offered), HELO, MAIL FROM:<path> [SIZE= BODY= AUTH=],
  RCPT TO:<path> (up to 100), DATA (354, dot-unstuffing, ends at CRLF.CRLF), RSET,
  NOOP, VRFY (252), HELP, QUIT (221); 503 for commands out of sequence, 501 for bad
  arguments, 500 for unknown commands and command lines over 512 octets, 555 for
  unknown MAIL parameters, 552 for messages over --max-size, 530 for MAIL before AUTH
  when --smtp-auth is set, 421 after 60 s of silence. A text line over 1000 octets,
  a bare CR or LF in the data, or 8-bit data without BODY=8BITMIME is accepted but
  listed in the message's "violations".
* HTTP webhook receiver on --http-port: any method on any path outside /__admin/ is
  recorded as a post and answered 200 {"ok": true} (HTTP/1.1, keep-alive, bodies by
  Content-Length or chunked).
* /__admin/ on the same HTTP port (JSON in/out; not recorded):
    GET    /__admin/                 this help
    GET    /__admin/messages[?delivered=1|0]   every SMTP delivery attempt, oldest first:
           {id, session, t, helo, auth_user, from, rcpts, data (text after dot-unstuffing,
            CRLF line ends as received), headers {lower-case name: value (first one)},
            header_list [[name, value], ...], body, size, violations, delivered (true =
            answered 250), reply (the code answered, null when dropped), stage, fault}
    DELETE /__admin/messages         forget them -> {cleared: N}
    GET    /__admin/posts[?delivered=1|0]      every webhook request, oldest first:
           {id, t, method, path, query, headers {lower-case name: value}, body (text),
            json (parsed body or null), delivered (answered 2xx), status (null when
            dropped), fault}
    DELETE /__admin/posts            -> {cleared: N}
    POST   /__admin/faults           {target: "smtp"|"webhook", count?=1,
             smtp_code?: 451 (with smtp_text?) | http_status?: 500 (with body?) | drop?: true,
             delay?: seconds (before answering; alone = answer normally, late),
             stage?: SMTP only, where the fault strikes: connect | mail | rcpt | data |
                     data_end (default: after the message's final dot),
             path_regex?: webhook only}
           -> {id}. Faults are taken first-come first-served; each faulted delivery
           attempt is still recorded (delivered false, fault set).
    GET    /__admin/faults           -> [fault, ...] with remaining and hits
    DELETE /__admin/faults           -> {cleared: N}
    GET    /__admin/stats            -> {messages, messages_delivered, messages_failed,
           posts, posts_delivered, posts_failed, smtp_sessions, smtp_inflight,
           webhook_inflight} (inflight: deliveries being held by a delay right now)
    POST   /__admin/reset            forget messages, posts, faults and counters
"""

import argparse
import base64
import binascii
import email.parser
import email.policy
import json
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_COMMAND_LINE = 512          # RFC 5321 4.5.3.1.4, CRLF included
MAX_TEXT_LINE = 1000            # RFC 5321 4.5.3.1.6, CRLF included
MAX_RECIPIENTS = 100            # RFC 5321 4.5.3.1.8 (the minimum a server must accept)
IDLE_TIMEOUT = 60.0
SMTP_STAGES = ("connect", "mail", "rcpt", "data", "data_end")

VERBOSE = False


def log(fmt, *args):
    if VERBOSE:
        sys.stderr.write("%.3f notify_sink: %s\n" % (time.time(), fmt % args))
        sys.stderr.flush()


class Store:
    """Everything the sink saw, and the faults still to inject (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self._clear()

    def _clear(self):
        self.messages = []
        self.posts = []
        self.faults = []
        self.fault_seq = 0
        self.message_seq = 0
        self.post_seq = 0
        self.session_seq = 0
        self.smtp_inflight = 0
        self.webhook_inflight = 0

    def reset(self):
        with self.lock:
            self._clear()

    def add_fault(self, spec):
        target = spec.get("target")
        if target not in ("smtp", "webhook"):
            raise ValueError('target must be "smtp" or "webhook"')
        count = spec.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("count must be a positive integer")
        fault = {"target": target, "count": count, "remaining": count, "hits": 0}
        if target == "smtp":
            if "http_status" in spec or "path_regex" in spec:
                raise ValueError("http_status and path_regex are for webhook faults")
            code = spec.get("smtp_code")
            if code is not None:
                if not isinstance(code, int) or not 400 <= code <= 599:
                    raise ValueError("smtp_code must be a 4xx or 5xx reply code")
                fault["smtp_code"] = code
                fault["smtp_text"] = str(spec.get("smtp_text") or
                                         ("Requested action aborted: injected fault" if code < 500
                                          else "Transaction failed: injected fault"))
            stage = spec.get("stage", "data_end")
            if stage not in SMTP_STAGES:
                raise ValueError("stage must be one of " + ", ".join(SMTP_STAGES))
            fault["stage"] = stage
        else:
            if "smtp_code" in spec or "stage" in spec:
                raise ValueError("smtp_code and stage are for smtp faults")
            status = spec.get("http_status")
            if status is not None:
                if not isinstance(status, int) or not 100 <= status <= 599:
                    raise ValueError("http_status must be an HTTP status code")
                fault["http_status"] = status
                fault["body"] = spec.get("body")
            regex = spec.get("path_regex")
            if regex is not None:
                re.compile(regex)
                fault["path_regex"] = regex
        fault["drop"] = bool(spec.get("drop", False))
        delay = spec.get("delay")
        if delay is not None:
            if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
                raise ValueError("delay must be a number of seconds")
            fault["delay"] = float(delay)
        if fault["drop"] and (fault.get("smtp_code") or fault.get("http_status")):
            raise ValueError("give drop or a code, not both")
        if not (fault["drop"] or fault.get("smtp_code") or fault.get("http_status") or "delay" in fault):
            raise ValueError("a fault needs smtp_code, http_status, drop or delay")
        with self.lock:
            self.fault_seq += 1
            fault["id"] = self.fault_seq
            self.faults.append(fault)
        return fault

    def take_fault(self, target, stage=None, path=None):
        with self.lock:
            for fault in self.faults:
                if fault["remaining"] <= 0 or fault["target"] != target:
                    continue
                if target == "smtp" and fault["stage"] != stage:
                    continue
                if target == "webhook" and fault.get("path_regex") and not re.search(fault["path_regex"], path or ""):
                    continue
                fault["remaining"] -= 1
                fault["hits"] += 1
                return dict(fault)
        return None

    def record_message(self, entry):
        with self.lock:
            self.message_seq += 1
            entry["id"] = self.message_seq
            self.messages.append(entry)

    def record_post(self, entry):
        with self.lock:
            self.post_seq += 1
            entry["id"] = self.post_seq
            self.posts.append(entry)

    def new_session(self):
        with self.lock:
            self.session_seq += 1
            return self.session_seq

    def inflight(self, which, delta):
        with self.lock:
            setattr(self, which, getattr(self, which) + delta)

    def stats(self):
        with self.lock:
            md = sum(1 for m in self.messages if m["delivered"])
            pd = sum(1 for p in self.posts if p["delivered"])
            return {"messages": len(self.messages), "messages_delivered": md,
                    "messages_failed": len(self.messages) - md,
                    "posts": len(self.posts), "posts_delivered": pd, "posts_failed": len(self.posts) - pd,
                    "smtp_sessions": self.session_seq, "smtp_inflight": self.smtp_inflight,
                    "webhook_inflight": self.webhook_inflight}


STORE = Store()
CONFIG = argparse.Namespace(hostname="sink.test", max_size=10 * 1024 * 1024, auth=None)


# ---------------------------------------------------------------------------
# SMTP
# ---------------------------------------------------------------------------

class Drop(Exception):
    """Close the connection now, without a reply."""


class LineTooLong(Exception):
    pass


PATH_RE = re.compile(r"^<([^<>\s]*)>(?:\s+(.*))?$")


def parse_path_argument(arg, keyword):
    """'FROM:<a@b> SIZE=10' -> ('a@b', {'SIZE': '10'}) or None when malformed."""
    m = re.match(r"^" + keyword + r":\s*(.*)$", arg, re.IGNORECASE)
    if not m:
        return None
    m = PATH_RE.match(m.group(1).strip())
    if not m:
        return None
    address = m.group(1)
    params = {}
    for p in (m.group(2) or "").split():
        k, _, v = p.partition("=")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]*$", k):
            return None
        params[k.upper()] = v if _ else None
    return address, params


def valid_mailbox(address):
    # local-part@domain; source routes (@a,@b:x@y) are accepted and ignored per RFC 5321 C
    if ":" in address and address.startswith("@"):
        address = address.split(":", 1)[1]
    if address.count("@") != 1:
        return False
    local, domain = address.split("@")
    return bool(local) and bool(domain) and len(local) <= 64 and len(domain) <= 255 \
        and re.match(r"^(\[[^\]]+\]|[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*)$",
                     domain) is not None


class SMTPHandler(socketserver.StreamRequestHandler):
    timeout = IDLE_TIMEOUT

    def setup(self):
        super().setup()
        self.session = STORE.new_session()
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self.reset_transaction()

    def reset_transaction(self):
        self.mail_from = None
        self.mail_params = {}
        self.rcpts = []

    # -- wire --------------------------------------------------------------

    def reply(self, code, *lines):
        lines = lines or ("",)
        out = []
        for i, text in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append("%d%s%s\r\n" % (code, sep, text))
        data = "".join(out).encode("utf-8")
        log("smtp#%d > %s", self.session, data.decode().rstrip())
        self.wfile.write(data)
        self.wfile.flush()

    def read_line(self, limit):
        line = self.rfile.readline(limit + 1)
        if not line:
            raise EOFError
        if len(line) > limit and not line.endswith(b"\n"):
            # swallow the rest of the overlong line
            while line and not line.endswith(b"\n"):
                line = self.rfile.readline(65536)
            raise LineTooLong
        return line

    def drop(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise Drop

    def apply_fault(self, stage, record):
        """A fault for this stage: delay, then a reply code or a drop. True when handled."""
        fault = STORE.take_fault("smtp", stage=stage)
        if not fault:
            return False
        log("smtp#%d fault %s at %s", self.session, fault["id"], stage)
        if fault.get("delay"):
            STORE.inflight("smtp_inflight", 1)
            try:
                time.sleep(fault["delay"])
            finally:
                STORE.inflight("smtp_inflight", -1)
        if not fault["drop"] and not fault.get("smtp_code"):
            record["delayed_by"] = fault
            return False                # a delay only: go on normally
        record.update(delivered=False, stage=stage, fault=fault,
                      reply=None if fault["drop"] else fault["smtp_code"])
        STORE.record_message(record)
        if fault["drop"]:
            self.drop()
        code = fault["smtp_code"]
        enhanced = "%d.0.0" % (code // 100) if self.esmtp else None
        self.reply(code, ("%s %s" % (enhanced, fault["smtp_text"])) if enhanced else fault["smtp_text"])
        if stage == "connect":
            raise Drop              # a refused greeting ends the session (RFC 5321 3.1)
        if stage in ("mail", "data", "data_end"):
            self.reset_transaction()
        return True

    def base_record(self):
        return {"session": self.session, "t": time.time(), "helo": self.helo, "auth_user": self.auth_user,
                "from": self.mail_from, "rcpts": list(self.rcpts), "data": None, "headers": {},
                "header_list": [], "body": None, "size": 0, "violations": [], "delivered": False,
                "reply": None, "stage": None, "fault": None}

    def enh(self, code):
        return (code + " ") if self.esmtp else ""

    # -- session -------------------------------------------------------------

    def handle(self):
        try:
            if self.apply_fault("connect", self.base_record()):
                return
            self.reply(220, "%s ESMTP notify_sink ready" % CONFIG.hostname)
            while True:
                try:
                    raw = self.read_line(MAX_COMMAND_LINE)
                except LineTooLong:
                    self.reply(500, self.enh("5.5.2") + "Line too long")
                    continue
                line = raw.decode("utf-8", "replace")
                if not line.endswith("\r\n"):
                    # RFC 5321 2.3.8: lines end with CRLF; a bare LF is not a line end
                    self.reply(500, self.enh("5.5.2") + "Syntax error: command lines end with CRLF")
                    continue
                line = line[:-2]
                log("smtp#%d < %s", self.session, line)
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                handler = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
                if handler is None:
                    self.reply(500, self.enh("5.5.2") + "Syntax error, command unrecognized")
                    continue
                if handler(arg.strip()) is False:
                    return
        except (Drop, EOFError, ConnectionError, socket.timeout, TimeoutError) as e:
            if isinstance(e, (socket.timeout, TimeoutError)):
                try:
                    self.reply(421, "4.4.2 %s Timeout, closing connection" % CONFIG.hostname)
                except OSError:
                    pass
            return
        except Exception:
            traceback.print_exc()
            try:
                self.reply(451, "4.3.0 Local error in processing")
            except OSError:
                pass

    def smtp_EHLO(self, arg):
        if not arg:
            self.reply(501, "5.5.4 Syntax: EHLO hostname")
            return
        self.helo, self.esmtp = arg, True
        self.reset_transaction()
        lines = ["%s greets %s" % (CONFIG.hostname, arg), "8BITMIME", "SIZE %d" % CONFIG.max_size,
                 "ENHANCEDSTATUSCODES", "PIPELINING"]
        if CONFIG.auth:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self.reply(250, *lines)

    def smtp_HELO(self, arg):
        if not arg:
            self.reply(501, "Syntax: HELO hostname")
            return
        self.helo, self.esmtp = arg, False
        self.reset_transaction()
        self.reply(250, "%s greets %s" % (CONFIG.hostname, arg))

    def smtp_AUTH(self, arg):
        if not CONFIG.auth or not self.esmtp:
            self.reply(502, self.enh("5.5.1") + "Command not implemented")
            return
        if self.auth_user is not None:
            self.reply(503, "5.5.1 Already authenticated")
            return
        if self.mail_from is not None:
            self.reply(503, "5.5.1 AUTH not permitted during a mail transaction")
            return
        parts = arg.split()
        if not parts:
            self.reply(501, "5.5.4 Syntax: AUTH mechanism")
            return
        mech = parts[0].upper()
        try:
            if mech == "PLAIN":
                if len(parts) > 1:
                    blob = parts[1]
                else:
                    self.reply(334, "")
                    blob = self.read_line(MAX_TEXT_LINE).decode().strip()
                if blob == "*":
                    self.reply(501, "5.0.0 Authentication cancelled")
                    return
                fields = base64.b64decode(blob, validate=True).split(b"\0")
                if len(fields) != 3:
                    raise ValueError
                user, password = fields[1].decode(), fields[2].decode()
            elif mech == "LOGIN":
                if len(parts) > 1:
                    user = base64.b64decode(parts[1], validate=True).decode()
                else:
                    self.reply(334, base64.b64encode(b"Username:").decode())
                    user = base64.b64decode(self.read_line(MAX_TEXT_LINE).strip(), validate=True).decode()
                self.reply(334, base64.b64encode(b"Password:").decode())
                password = base64.b64decode(self.read_line(MAX_TEXT_LINE).strip(), validate=True).decode()
            else:
                self.reply(504, "5.5.4 Unrecognized authentication type")
                return
        except (ValueError, binascii.Error, UnicodeDecodeError, LineTooLong):
            self.reply(501, "5.5.2 Cannot decode response")
            return
        if (user, password) != CONFIG.auth:
            self.reply(535, "5.7.8 Authentication credentials invalid")
            return
        self.auth_user = user
        self.reply(235, "2.7.0 Authentication successful")

    def smtp_MAIL(self, arg):
        if self.helo is None:
            self.reply(503, self.enh("5.5.1") + "Error: send HELO/EHLO first")
            return
        if self.mail_from is not None:
            self.reply(503, self.enh("5.5.1") + "Error: nested MAIL command")
            return
        parsed = parse_path_argument(arg, "FROM")
        if parsed is None:
            self.reply(501, self.enh("5.5.4") + "Syntax: MAIL FROM:<address>")
            return
        address, params = parsed
        if address and not valid_mailbox(address):
            self.reply(553, self.enh("5.1.7") + "Bad sender address syntax")
            return
        if params and not self.esmtp:
            self.reply(555, "MAIL parameters need EHLO")
            return
        for k, v in params.items():
            if k == "SIZE":
                if v is None or not v.isdigit():
                    self.reply(501, "5.5.4 Bad SIZE parameter")
                    return
                if int(v) > CONFIG.max_size:
                    self.reply(552, "5.3.4 Message size exceeds fixed limit")
                    return
            elif k == "BODY":
                if (v or "").upper() not in ("7BIT", "8BITMIME"):
                    self.reply(501, "5.5.4 Bad BODY parameter")
                    return
            elif k == "AUTH" and CONFIG.auth:
                pass
            else:
                self.reply(555, "5.5.4 MAIL parameter %s not recognized" % k)
                return
        if CONFIG.auth and self.auth_user is None:
            self.reply(530, "5.7.0 Authentication required")
            return
        record = self.base_record()
        record["from"] = address
        if self.apply_fault("mail", record):
            return
        self.mail_from, self.mail_params = address, params
        self.reply(250, self.enh("2.1.0") + "Ok")

    def smtp_RCPT(self, arg):
        if self.mail_from is None:
            self.reply(503, self.enh("5.5.1") + "Error: need MAIL command")
            return
        parsed = parse_path_argument(arg, "TO")
        if parsed is None:
            self.reply(501, self.enh("5.5.4") + "Syntax: RCPT TO:<address>")
            return
        address, params = parsed
        if params:
            self.reply(555, self.enh("5.5.4") + "RCPT parameters not recognized")
            return
        if not (valid_mailbox(address) or address.lower() == "postmaster"):
            self.reply(553, self.enh("5.1.3") + "Bad recipient address syntax")
            return
        if len(self.rcpts) >= MAX_RECIPIENTS:
            self.reply(452, self.enh("4.5.3") + "Too many recipients")
            return
        record = self.base_record()
        record["rcpts"] = self.rcpts + [address]
        if self.apply_fault("rcpt", record):
            return
        self.rcpts.append(address)
        self.reply(250, self.enh("2.1.5") + "Ok")

    def smtp_DATA(self, arg):
        if arg:
            self.reply(501, self.enh("5.5.4") + "Syntax: DATA")
            return
        if self.mail_from is None:
            self.reply(503, self.enh("5.5.1") + "Error: need MAIL command")
            return
        if not self.rcpts:
            self.reply(503, self.enh("5.5.1") + "Error: need RCPT command")
            return
        record = self.base_record()
        if self.apply_fault("data", record):
            return
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        chunks, size, violations, too_big = [], 0, [], False
        eight_bit = False
        while True:
            line = self.rfile.readline(65536)
            if not line:
                raise EOFError
            while not line.endswith(b"\n"):
                more = self.rfile.readline(65536)
                if not more:
                    raise EOFError
                line += more
            if line == b".\r\n":
                break
            if not line.endswith(b"\r\n"):
                violations.append("bare LF in the data")
            if b"\r" in line.rstrip(b"\r\n") or line.endswith(b"\r\r\n"):
                violations.append("bare CR in the data")
            if len(line) > MAX_TEXT_LINE:
                violations.append("text line of %d octets (more than %d)" % (len(line), MAX_TEXT_LINE))
            if line.startswith(b"."):
                line = line[1:]                 # RFC 5321 4.5.2: dot-unstuffing
            if any(b > 127 for b in line):
                eight_bit = True
            size += len(line)
            if size > CONFIG.max_size:
                too_big = True
            else:
                chunks.append(line)
        if eight_bit and (self.mail_params.get("BODY") or "").upper() != "8BITMIME":
            violations.append("8-bit data without BODY=8BITMIME")
        data = b"".join(chunks)
        record = self.base_record()
        record["size"] = size
        record["violations"] = sorted(set(violations))
        if too_big:
            record.update(delivered=False, reply=552, stage="data_end")
            STORE.record_message(record)
            self.reset_transaction()
            self.reply(552, self.enh("5.3.4") + "Message size exceeds fixed limit")
            return
        text = data.decode("utf-8", "replace")
        record["data"] = text
        try:
            msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
            header_list = [[k, str(v)] for k, v in msg.items()]
            headers = {}
            for k, v in header_list:
                headers.setdefault(k.lower(), v)
            record["header_list"] = header_list
            record["headers"] = headers
            body = msg.get_payload(decode=False)
            record["body"] = body if isinstance(body, str) else None
        except Exception as e:          # keep the raw data even when it does not parse
            record["violations"].append("unparsable message: %s" % e)
        if self.apply_fault("data_end", record):
            return
        record.update(delivered=True, reply=250, stage="data_end")
        STORE.record_message(record)
        log("smtp#%d delivered message %d from %s to %s", self.session, record["id"], self.mail_from, self.rcpts)
        qid = record["id"]
        self.reset_transaction()
        self.reply(250, self.enh("2.0.0") + "Ok: queued as %d" % qid)

    def smtp_RSET(self, arg):
        if arg:
            self.reply(501, self.enh("5.5.4") + "Syntax: RSET")
            return
        self.reset_transaction()
        self.reply(250, self.enh("2.0.0") + "Ok")

    def smtp_NOOP(self, arg):
        self.reply(250, self.enh("2.0.0") + "Ok")

    def smtp_VRFY(self, arg):
        if not arg:
            self.reply(501, self.enh("5.5.4") + "Syntax: VRFY address")
            return
        self.reply(252, self.enh("2.5.2") + "Cannot VRFY user, but will accept message")

    def smtp_EXPN(self, arg):
        self.reply(502, self.enh("5.5.1") + "Command not implemented")

    def smtp_STARTTLS(self, arg):
        self.reply(502, self.enh("5.5.1") + "STARTTLS not offered")

    def smtp_HELP(self, arg):
        self.reply(214, "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")

    def smtp_QUIT(self, arg):
        self.reply(221, self.enh("2.0.0") + "%s closing connection" % CONFIG.hostname)
        return False


class SMTPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 64


# ---------------------------------------------------------------------------
# HTTP: webhook receiver and admin API
# ---------------------------------------------------------------------------

class HTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "notify_sink/1.0"
    timeout = IDLE_TIMEOUT

    def log_message(self, fmt, *args):
        if VERBOSE:
            log("http %s", fmt % args)

    def send(self, status, payload, ctype="application/json"):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def read_body(self):
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            data = b""
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass            # trailers
                    return data
                data += self.rfile.read(size)
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def dispatch(self):
        try:
            url = urlsplit(self.path)
            body = self.read_body()
            if url.path == "/__admin" or url.path.startswith("/__admin/"):
                self.admin(url, body)
            else:
                self.webhook(url, body)
        except Drop:
            self.close_connection = True
        except (ConnectionError, socket.timeout, TimeoutError):
            self.close_connection = True
        except Exception as e:
            traceback.print_exc()
            self.send(500, {"error": "sink bug: %s" % e})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = dispatch

    def webhook(self, url, body):
        headers = {}
        for k, v in self.headers.items():
            headers.setdefault(k.lower(), v)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        entry = {"t": time.time(), "method": self.command, "path": url.path, "query": url.query,
                 "headers": headers, "body": body.decode("utf-8", "replace"), "json": parsed,
                 "delivered": False, "status": None, "fault": None}
        fault = STORE.take_fault("webhook", path=self.path)
        if fault:
            log("http fault %s on %s %s", fault["id"], self.command, self.path)
            entry["fault"] = fault
            if fault.get("delay"):
                STORE.inflight("webhook_inflight", 1)
                try:
                    time.sleep(fault["delay"])
                finally:
                    STORE.inflight("webhook_inflight", -1)
            if fault["drop"]:
                STORE.record_post(entry)
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise Drop
            if fault.get("http_status"):
                status = fault["http_status"]
                entry.update(status=status, delivered=200 <= status < 300)
                STORE.record_post(entry)
                b = fault.get("body")
                payload = {"error": "injected fault"} if b is None else (b.encode() if isinstance(b, str) else b)
                self.send(status, payload)
                return
        entry.update(status=200, delivered=True)
        STORE.record_post(entry)
        self.send(200, {"ok": True, "id": entry["id"]})

    def admin(self, url, body):
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        method = self.command
        try:
            spec = json.loads(body) if body else {}
        except ValueError:
            self.send(400, {"error": "body is not JSON"})
            return

        def filtered(items):
            want = query.get("delivered")
            if want is None:
                return list(items)
            return [i for i in items if i["delivered"] == (want in ("1", "true"))]

        if path == "/__admin" and method == "GET":
            self.send(200, {"help": __doc__})
        elif path == "/__admin/messages" and method == "GET":
            with STORE.lock:
                payload = json.dumps(filtered(STORE.messages)).encode()
            self.send(200, payload)
        elif path == "/__admin/messages" and method == "DELETE":
            with STORE.lock:
                n = len(STORE.messages)
                STORE.messages = []
            self.send(200, {"cleared": n})
        elif path == "/__admin/posts" and method == "GET":
            with STORE.lock:
                payload = json.dumps(filtered(STORE.posts)).encode()
            self.send(200, payload)
        elif path == "/__admin/posts" and method == "DELETE":
            with STORE.lock:
                n = len(STORE.posts)
                STORE.posts = []
            self.send(200, {"cleared": n})
        elif path == "/__admin/faults" and method == "POST":
            if not isinstance(spec, dict):
                self.send(400, {"error": "body must be a JSON object"})
                return
            try:
                fault = STORE.add_fault(spec)
            except (ValueError, re.error) as e:
                self.send(400, {"error": str(e)})
                return
            self.send(201, {"id": fault["id"]})
        elif path == "/__admin/faults" and method == "GET":
            with STORE.lock:
                payload = json.dumps(STORE.faults).encode()
            self.send(200, payload)
        elif path == "/__admin/faults" and method == "DELETE":
            with STORE.lock:
                n = sum(1 for f in STORE.faults if f["remaining"] > 0)
                STORE.faults = []
            self.send(200, {"cleared": n})
        elif path == "/__admin/stats" and method == "GET":
            self.send(200, STORE.stats())
        elif path == "/__admin/reset" and method == "POST":
            STORE.reset()
            self.send(200, {"reset": True})
        else:
            self.send(404, {"error": "no admin endpoint %s %s" % (method, path)})


class HTTPServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 64


def main():
    global VERBOSE
    ap = argparse.ArgumentParser(description="fake SMTP + webhook sink for sync's tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--smtp-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--hostname", default="sink.test", help="name in the greeting")
    ap.add_argument("--max-size", type=int, default=10 * 1024 * 1024)
    ap.add_argument("--smtp-auth", default=None, help="USER:PASS: offer AUTH PLAIN LOGIN and require it")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    VERBOSE = args.verbose
    CONFIG.hostname = args.hostname
    CONFIG.max_size = args.max_size
    if args.smtp_auth:
        user, sep, password = args.smtp_auth.partition(":")
        if not sep:
            ap.error("--smtp-auth wants USER:PASS")
        CONFIG.auth = (user, password)

    smtp = SMTPServer((args.host, args.smtp_port), SMTPHandler)
    http = HTTPServer((args.host, args.http_port), HTTPHandler)
    for server in (smtp, http):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("listening smtp=%d http=%d" % (smtp.server_address[1], http.server_address[1]), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
