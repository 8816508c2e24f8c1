"""The tests run offline. tests/conftest.py puts this folder on the PYTHONPATH of every process a test starts,
where Python imports this module at startup: a socket may then connect only to a loopback address or a unix
socket, anything else raises OSError. conftest.py applies the same block_network() to the test process."""
import ipaddress
import socket


def is_local(address):
    """Whether a socket address is a unix socket's path or a loopback host ('localhost', 127.x.x.x, ::1)."""
    if not isinstance(address, tuple):
        return True
    try:
        return address[0] == 'localhost' or ipaddress.ip_address(address[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def block_network(patch=setattr):
    """Make socket.socket.connect/connect_ex and socket.create_connection refuse non-local addresses;
    `patch`: setattr, or pytest's monkeypatch.setattr to undo it after a test."""
    def guarded(connect, i):  # connect with its argument number i (the address) checked first
        def checked(*args, **kwargs):
            if not is_local(args[i]):
                raise OSError(f'tests run offline: no connection to {args[i]!r}')
            return connect(*args, **kwargs)
        return checked

    patch(socket.socket, 'connect', guarded(socket.socket.connect, 1))
    patch(socket.socket, 'connect_ex', guarded(socket.socket.connect_ex, 1))
    patch(socket, 'create_connection', guarded(socket.create_connection, 0))


if __name__ == 'sitecustomize':
    block_network()
