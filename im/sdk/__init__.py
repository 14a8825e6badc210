"""Python client SDK: `Client` keeps a session with the gateway and yields its pushes."""

from im.sdk.bindings import BindRefused
from im.sdk.client import AuthError, Client, ClientClosed, JoinRefused, Message, ServerError
from im.sdk.dispatch import DispatchError, Route, route
from im.sdk.transport import Address, TcpTransport, TransportClosed, WsTransport

__all__ = [
    "Address",
    "AuthError",
    "BindRefused",
    "Client",
    "ClientClosed",
    "DispatchError",
    "JoinRefused",
    "Message",
    "Route",
    "ServerError",
    "TcpTransport",
    "TransportClosed",
    "WsTransport",
    "route",
]
