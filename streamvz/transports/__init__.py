"""Transports: how clients reach the engine. `service` (sessions, asks, frames; transport-free),
`ws` (websocket + web page), `mqtt` (MQTT v5 over a broker), `security` (sources, rates, tokens)."""
