"""An HTTP proxy in front of a real S3 endpoint that can fail, hold or
watch chosen requests: the "slow gateway" and "refused rewrite" of the S3
tests, against the real RGW behind it.

Requests are forwarded unchanged, Host header included, so SigV4
signatures made for the proxy's address still match at the gateway:

    with FaultProxy(rgw.endpoint) as p:
        p.rules.append(lambda req: Answer(403) if req.is_lock_rewrite() else None)
        env["CBTFS_S3_ENDPOINT"] = p.endpoint

A rule is called with each Request and returns None (next rule, then
forward), Answer (sent instead of forwarding), or Hold (the request waits
for an event, then is forwarded only if its client is still connected:
a gateway that had not processed a request its client abandoned)."""

import http.client
import http.server
import select
import socket
import threading
import urllib.parse


class Answer:
    def __init__(self, status, code="InjectedFault"):
        self.status, self.code = status, code


class Hold:
    def __init__(self, event, before=None):
        self.event, self.before = event, before  # before(): run once the request has arrived


class Request:
    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body
        url = urllib.parse.urlsplit(path)
        self.key = urllib.parse.unquote(url.path)  # "/bucket/key"
        self.query = urllib.parse.parse_qs(url.query, keep_blank_values=True)

    def is_lock_rewrite(self):
        return self.method == "PUT" and self.key.endswith("/lock") and "If-Match" in self.headers

    def is_manifest_put(self):
        return self.method == "PUT" and "/points/" in self.key


class FaultProxy:
    def __init__(self, upstream):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rules = []
        self.log = []  # (method, key, query, status, Range header) of every request, in order
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req = Request(self.command, self.path, self.headers, body)
                action = None
                for rule in list(proxy.rules):
                    action = rule(req)
                    if action is not None:
                        break
                if isinstance(action, Hold):
                    if action.before:
                        action.before()
                    action.event.wait()
                    if not self.client_connected():
                        proxy.record(req, "dropped")
                        self.close_connection = True
                        return
                if isinstance(action, Answer):
                    proxy.record(req, action.status)
                    self.send(action.status, [("Content-Type", "application/xml")],
                              f"<Error><Code>{action.code}</Code></Error>".encode())
                    return
                status, headers, data = proxy.forward(req)
                proxy.record(req, status)
                self.send(status, headers, data)

            def client_connected(self):
                r, _, _ = select.select([self.connection], [], [], 0)
                if not r:
                    return True
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) != b""
                except OSError:
                    return False

            def send(self, status, headers, data):
                self.send_response_only(status)
                length_sent = False
                for name, value in headers:
                    if name.lower() in ("transfer-encoding", "connection"):
                        continue
                    if name.lower() == "content-length":
                        if self.command != "HEAD":
                            value = str(len(data))
                        length_sent = True
                    self.send_header(name, value)
                if not length_sent:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def record(self, req, status):
        with self.lock:
            self.log.append((req.method, req.key, req.query, status, req.headers.get("Range")))

    def forward(self, req):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            conn.putrequest(req.method, req.path, skip_host=True, skip_accept_encoding=True)
            for name, value in req.headers.items():
                conn.putheader(name, value)
            conn.endheaders(req.body if req.body else None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
