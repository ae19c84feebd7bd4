"""Talking to servers: ``fetch`` (HTTP for one server, guarded), ``politeness`` (pacing and congestion
control), ``robots`` (robots.txt by RFC 9309) and ``hosts`` (every host a rank talks to and its rate slot)."""
