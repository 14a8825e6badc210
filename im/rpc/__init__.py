"""Internal RPC between services: msgpack requests pipelined over one TCP connection.

The wire format is described in `im.rpc.wire`.
"""

from im.rpc.client import RpcClient
from im.rpc.server import Handler, RpcServer
from im.rpc.wire import RpcError, RpcTimeout, RpcUnavailable

__all__ = ["Handler", "RpcClient", "RpcError", "RpcServer", "RpcTimeout", "RpcUnavailable"]
