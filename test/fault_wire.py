"""The fault kinds of test/fakelib.py checked on the wire, against any of the fake APIs: the
self-tests of the four fakes call test_fault_kinds() with a listing path of their own."""
import base64
import json
import socket
import time


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok -", what)


def raw_get(port, path, headers, timeout=20.0, hang_up_after=None):
    """GET over a plain socket (no gzip). -> {status, headers, length, body, ended, t_data, t_end}:
    ended = 'complete' (Content-Length bytes read), 'eof', 'reset', 'timeout' or 'hung_up' (we closed
    after hang_up_after body bytes); t_data = seconds until the last bytes arrived, t_end = until the end."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (path, port)
    head += "".join("%s: %s\r\n" % kv for kv in headers.items()) + "\r\n"
    t0 = time.time()
    sock.sendall(head.encode())
    res = {"status": None, "headers": {}, "length": None, "ended": None, "t_data": None}
    buf = b""
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                res["ended"] = "reset"
                break
            except socket.timeout:
                res["ended"] = "timeout"
                break
            if not chunk:
                res["ended"] = "eof"
                break
            res["t_data"] = time.time() - t0
            buf += chunk
            if res["status"] is None and b"\r\n\r\n" in buf:
                top, buf = buf.split(b"\r\n\r\n", 1)
                lines = top.decode("latin-1").split("\r\n")
                res["status"] = int(lines[0].split()[1])
                res["headers"] = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
                res["length"] = int(res["headers"].get("content-length", "-1"))
            if res["status"] is not None:
                if 0 <= res["length"] <= len(buf):
                    res["ended"] = "complete"
                    break
                if hang_up_after is not None and len(buf) >= hang_up_after:
                    res["ended"] = "hung_up"
                    break
    finally:
        res["t_end"] = time.time() - t0
        res["body"] = buf
        sock.close()
    return res


def expected_wrong_type(v):
    """What a wrong_types fault makes of a value (written independently of the fakes)."""
    if v is True or v is False:
        return [v]
    if isinstance(v, (int, float)):
        return {"value": v}
    if isinstance(v, str):
        return len(v)
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, list):
        return len(v)
    return v


def test_fault_kinds(fk, path, headers, regex, holders, keep, name, empty_path):
    """The fault kinds added for issue 6 (reset, truncate/stall/corrupt of the real answer, body_b64,
    skip), read with a raw socket. `path` answers a JSON page of records; holders(doc) -> per record
    the object whose values a corrupt fault changes; keep = the keys wrong_types leaves alone."""
    fk.admin("DELETE", "faults")
    good = raw_get(fk.port, path, headers)
    doc = json.loads(good["body"])
    check(good["status"] == 200 and good["ended"] == "complete" and len(holders(doc)) >= 5
          and "content-encoding" not in good["headers"], "%s: a page of records over a raw socket" % name)

    bad = [fk.call("POST", "/__admin/faults", body=b)[0] for b in (
        {"path_regex": "x", "corrupt": "nope"}, {"path_regex": "x", "stall": -1}, {"path_regex": "x", "stall": True},
        {"path_regex": "x", "body_b64": "!!not base64"}, {"path_regex": "x", "corrupt": "huge_value", "huge_bytes": 0},
        {"path_regex": "x", "status": 500, "skip": -1}, {"path_regex": "x"}, {"path_regex": "(", "reset": True})]
    check(bad == [400] * 8 and fk.admin("GET", "faults") == [], "faults: invalid new options -> 400, nothing stored")

    fk.admin("POST", "faults", {"path_regex": regex, "reset": True})
    r = raw_get(fk.port, path, headers)
    check(r["ended"] == "reset" and r["status"] is None and r["body"] == b"",
          "reset: the connection is reset (RST), no answer")

    fk.admin("POST", "faults", {"path_regex": regex, "truncate": True})
    r = raw_get(fk.port, path, headers)
    check(r["status"] == 200 and r["ended"] == "eof" and abs(r["length"] - len(good["body"])) <= 64
          and len(r["body"]) == r["length"] // 2 and r["body"][:64] == good["body"][:64],
          "truncate without status: the real answer, full Content-Length, half the body, then closed")

    fk.admin("POST", "faults", {"path_regex": regex, "stall": 1.5})
    r = raw_get(fk.port, path, headers)
    check(r["status"] == 200 and r["ended"] == "eof" and abs(r["length"] - len(good["body"])) <= 64
          and len(r["body"]) == r["length"] // 2 and r["t_data"] < 1.0 and 1.4 <= r["t_end"] < 10,
          "stall: half the real body at once, then nothing for 1.5 s, then closed (%.2f s / %.2f s)"
          % (r["t_data"], r["t_end"]))
    fk.admin("POST", "faults", {"path_regex": regex, "stall": 60})
    r = raw_get(fk.port, path, headers, hang_up_after=1)
    t0 = time.time()
    again = raw_get(fk.port, path, headers)
    check(r["ended"] == "hung_up" and r["status"] == 200 and again["status"] == 200
          and again["ended"] == "complete" and time.time() - t0 < 5,
          "stall 60 s: the client hangs up; other requests are served meanwhile")

    raw = b'{"records":[{"Id":"x","Name":"\xff\xfe\xc3\x28 bad \x00 utf-8"}]}'
    fk.admin("POST", "faults", {"path_regex": regex, "body_b64": base64.b64encode(raw).decode()})
    r = raw_get(fk.port, path, headers)
    fk.admin("POST", "faults", {"path_regex": regex, "status": 502, "content_type": "text/html",
                                "body_b64": base64.b64encode(b"<html>\xff</html>").decode()})
    r2 = raw_get(fk.port, path, headers)
    check(r["status"] == 200 and r["ended"] == "complete" and r["body"] == raw
          and r2["status"] == 502 and r2["body"] == b"<html>\xff</html>"
          and r2["headers"]["content-type"] == "text/html", "body_b64: raw bytes (status 200 by default, or given)")
    fk.admin("POST", "faults", {"path_regex": regex, "body_b64": base64.b64encode(raw).decode(), "truncate": True})
    r = raw_get(fk.port, path, headers)
    check(r["status"] == 200 and r["length"] == len(raw) and r["body"] == raw[:len(raw) // 2] and r["ended"] == "eof",
          "body_b64 + truncate: half the raw bytes")

    fk.admin("POST", "faults", {"path_regex": regex, "corrupt": "malformed"})
    r = raw_get(fk.port, path, headers)
    try:
        json.loads(r["body"])
        parsed = True
    except ValueError:
        parsed = False
    check(r["status"] == 200 and r["ended"] == "complete" and r["length"] == len(r["body"])
          and abs(len(r["body"]) - len(good["body"]) * 2 // 3) <= 64 and r["body"][:64] == good["body"][:64]
          and not parsed, "corrupt malformed: a complete answer (right Content-Length) with JSON cut at 2/3")

    fk.admin("POST", "faults", {"path_regex": regex, "corrupt": "wrong_types"})
    r = raw_get(fk.port, path, headers)
    bad_doc = json.loads(r["body"])
    hg, hb = holders(doc), holders(bad_doc)
    same_shape = set(bad_doc) == set(doc) and all(type(bad_doc[k]) is type(doc[k]) for k in doc)
    changed = sum(1 for g in hg for k in g if k not in keep and g[k] is not None)
    values_ok = len(hg) == len(hb) and all(
        set(g) == set(b) and all(b[k] == (g[k] if k in keep else expected_wrong_type(g[k])) for k in g)
        for g, b in zip(hg, hb))
    check(r["status"] == 200 and r["length"] == len(r["body"]) and same_shape and values_ok and changed > 0,
          "corrupt wrong_types: envelope intact, every value of every record (%d) changed type, keys kept" % changed)

    fk.admin("POST", "faults", {"path_regex": regex, "corrupt": "huge_value"})
    r = raw_get(fk.port, path, headers)
    bad_doc = json.loads(r["body"])
    hg, hb = holders(doc), holders(bad_doc)
    diff = [k for k in hb[0] if hb[0].get(k) != hg[0].get(k)]
    check(r["status"] == 200 and r["length"] == len(r["body"]) > 5 * 1024 * 1024 and len(diff) == 1
          and isinstance(hg[0].get(diff[0]), str) and diff[0] not in keep
          and len(hb[0][diff[0]]) == 5 * 1024 * 1024 and hb[1:] == hg[1:],
          "corrupt huge_value: one string field (%s) of the first record is 5 MiB, the rest unchanged"
          % (diff[:1],))
    field = sorted(k for k in hg[0] if k not in keep)[-1]
    fk.admin("POST", "faults", {"path_regex": regex, "corrupt": "huge_value", "corrupt_field": field,
                                "huge_bytes": 1000})
    bad_doc = json.loads(raw_get(fk.port, path, headers)["body"])
    hb = holders(bad_doc)
    check(hb[0][field] == ("0123456789abcdef" * 63)[:1000] and hb[1:] == hg[1:],
          "corrupt huge_value with corrupt_field %s and huge_bytes 1000" % field)

    for mode in ("wrong_types", "huge_value"):
        fk.admin("DELETE", "faults")
        fk.admin("POST", "faults", {"path_regex": regex, "corrupt": mode})
        empty = raw_get(fk.port, empty_path, headers)
        armed = fk.admin("GET", "faults")[0]
        hit = json.loads(raw_get(fk.port, path, headers)["body"])
        check(empty["status"] == 200 and holders(json.loads(empty["body"])) == [] and armed["remaining"] == 1
              and armed["hits"] == 0 and holders(hit) != holders(doc) and fk.admin("GET", "faults")[0]["remaining"] == 0,
              "corrupt %s: a page without records passes unchanged and the fault stays armed for the next one" % mode)
    fk.admin("DELETE", "faults")
    fk.admin("POST", "faults", {"path_regex": regex, "status": 503, "skip": 1, "count": 2})
    codes = [raw_get(fk.port, path, headers)["status"] for _ in range(4)]
    listed = fk.admin("GET", "faults")
    check(codes == [200, 503, 503, 200] and listed[-1]["hits"] == 2 and listed[-1]["skip"] == 0,
          "skip 1, count 2: one request passes, the next two get the fault")
    fk.admin("DELETE", "faults")
    fk.admin("POST", "faults", {"path_regex": regex, "status": 502, "skip": 2})
    fk.admin("POST", "faults", {"path_regex": regex, "status": 504})
    codes = [raw_get(fk.port, path, headers)["status"] for _ in range(5)]
    check(codes == [200, 200, 502, 504, 200],
          "faults on one path serve in order; a skipped request passes untouched (not to the next fault)")
    fk.admin("DELETE", "faults")
