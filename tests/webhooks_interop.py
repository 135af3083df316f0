"""The reference Python library's side of the interoperability tests in
tests/webhooks.rs, run with the interpreter of a virtualenv that has the
`standardwebhooks` package.

    python webhooks_interop.py serve SECRET...
        Serves on a free loopback port, printed on the first line, until
        stdin closes. Each POST is verified with each secret on its own; the
        answer is 200 and {"verified_by": [indices of the secrets that verify
        it]} when one does, 401 and the library's error otherwise.

    python webhooks_interop.py send URL ID SECRET... < BODY
        Signs BODY (bytes) as ID, now, with each secret, sends it to URL with
        the signatures in one header, and prints the status of the answer.
"""

import http.server
import json
import sys
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def serve(secrets):
    hooks = [Webhook(secret) for secret in secrets]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {name: value for name, value in self.headers.items()}
            verified_by, errors = [], []
            for index, hook in enumerate(hooks):
                try:
                    hook.verify(body, headers, json_parse=False)
                    verified_by.append(index)
                except WebhookVerificationError as error:
                    errors.append(str(error))
            answer = json.dumps({"verified_by": verified_by, "errors": errors}).encode()
            self.send_response(200 if verified_by else 401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *arguments):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()


def send(url, msg_id, secrets):
    body = sys.stdin.buffer.read()
    now = datetime.now(tz=timezone.utc)
    signatures = [Webhook(secret).sign(msg_id, now, body) for secret in secrets]
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("content-type", "application/json")
    request.add_header("webhook-id", msg_id)
    request.add_header("webhook-timestamp", str(int(now.timestamp())))
    request.add_header("webhook-signature", " ".join(signatures))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.status)
    except urllib.error.HTTPError as error:
        print(error.code)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2:])
    else:
        send(sys.argv[2], sys.argv[3], sys.argv[4:])
