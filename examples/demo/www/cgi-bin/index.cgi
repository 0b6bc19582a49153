#!/bin/sh
# The demo page: shows $MESSAGE and which replica answered, like Kubernetes' "hello" demo.
# busybox httpd runs /cgi-bin/index.cgi for "/" when there is no index.html, and passes its
# own environment through, so the container's env reaches this script.
replica="${P2PORCH_REPLICA:-$(hostname)}"
message="${MESSAGE:-Hello from p2porch}"
# The ingress adds X-Forwarded-For (the client's address); without it, the peer is the proxy.
client="${HTTP_X_FORWARDED_FOR:-$REMOTE_ADDR}"

escape() {
  printf '%s' "$1" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'
}

printf 'Content-Type: text/html; charset=utf-8\r\n'
printf 'Cache-Control: no-store\r\n'
printf '\r\n'
cat <<PAGE
<!doctype html>
<html>
<head><title>p2porch demo</title></head>
<body>
<h1 id="message">$(escape "$message")</h1>
<p>Served by replica <code id="replica">$(escape "$replica")</code>.</p>
<p>Your address: <code id="client">$(escape "$client")</code>.</p>
</body>
</html>
PAGE
