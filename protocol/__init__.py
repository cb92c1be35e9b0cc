"""What crosses the wire between coordinator and hospital: the message schemas both roles build
and check. Server and client import it; it imports neither."""
