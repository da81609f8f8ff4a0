"""gRPC through pyroute (issue 18): a real grpcio server behind a service with
upstreamProto=h2c, a real grpcio client over h2c (H2C=true) and over TLS (ALPN h2):
unary and server-streaming calls, metadata and trailers, a status error passed through,
and an upstream that is gone or dies mid-call ending as UNAVAILABLE, never a hang.
Generic handlers with raw-bytes messages: no protobuf code generation."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
import trustme

from support.upstream import free_port, wait_until
from conftest import start_pyroute, stop_pyroute

SERVICE = "test.Echo"


class GrpcServer:
    """A grpcio server on 127.0.0.N: Unary echoes with metadata and trailers, Stream sends
    `n` messages, Hang sends one then waits for `release`, Fail aborts with NOT_FOUND."""

    def __init__(self, ip: str = "127.0.0.45", credentials=None):
        self.release = threading.Event()
        self.hanging = threading.Event()

        def unary(request, context):
            meta = dict(context.invocation_metadata())
            context.set_trailing_metadata((("x-trailer", "t-" + meta.get("x-meta", "")),))
            context.send_initial_metadata((("x-initial", "i"),))
            return b"echo:" + request

        def stream(request, context):
            for i in range(int(request)):
                yield b"message %d" % i

        def hang(request, context):
            yield b"first"
            self.hanging.set()
            self.release.wait(30)

        def fail(request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Hang": grpc.unary_stream_rpc_method_handler(hang),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers((handler,))
        self.ip = ip
        if credentials is None:
            self.port = self.server.add_insecure_port(f"{ip}:0")
        else:
            self.port = self.server.add_secure_port(f"{ip}:0", credentials)
        self.server.start()

    def stop(self):
        self.release.set()
        self.server.stop(0)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def grpc_proxy(dns, ca, tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    leaf = ca.issue_cert("grpc.test")
    (certs / "g.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes())
    http_port, tls_port = free_port(), free_port()
    p = start_pyroute(dns, DEFAULT_PORTS=f"{http_port},{tls_port}:ssl", CERTS_DIR=str(certs), H2C="true",
                      SECRETS_DIR=str(tmp_path_factory.mktemp("secrets")))
    p.http_port, p.tls_port = http_port, tls_port
    yield p
    stop_pyroute(p)


@pytest.fixture
def proxy(grpc_proxy):
    yield grpc_proxy
    alive = grpc_proxy.alive()
    grpc_proxy.remove_all()
    assert alive, f"pyroute died during the test:\n{grpc_proxy.log()}"


@pytest.fixture
def server():
    s = GrpcServer()
    yield s
    s.stop()


def route(proxy, dns, server, name: str, **params):
    dns.set_service(name, server.ip)
    proxy.reconfigure(serviceName=name, servicePath=f"/{SERVICE}", port=server.port, upstreamProto="h2c", **params)


def h2c_channel(proxy):
    return grpc.insecure_channel(f"127.0.0.1:{proxy.http_port}")


def test_unary_and_streaming_calls_over_h2c(proxy, dns, server):
    route(proxy, dns, server, "grpc-h2c")
    with h2c_channel(proxy) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        reply, call = unary.with_call(b"hi", metadata=(("x-meta", "m"),), timeout=10)
        assert reply == b"echo:hi"
        assert ("x-initial", "i") in call.initial_metadata()
        assert ("x-trailer", "t-m") in call.trailing_metadata()
        assert call.code() == grpc.StatusCode.OK
        stream = channel.unary_stream(f"/{SERVICE}/Stream")
        assert list(stream(b"5", timeout=10)) == [b"message %d" % i for i in range(5)]
        many = list(stream(b"2000", timeout=20))  # past the windows of both sides
        assert len(many) == 2000 and many[-1] == b"message 1999"


def test_a_status_error_passes_through(proxy, dns, server):
    route(proxy, dns, server, "grpc-fail")
    with h2c_channel(proxy) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(f"/{SERVICE}/Fail")(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such thing"


def test_unary_call_over_tls_with_alpn_h2(proxy, dns, server, ca):
    route(proxy, dns, server, "grpc-tls")
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    with grpc.secure_channel(f"127.0.0.1:{proxy.tls_port}", creds,
                             options=(("grpc.ssl_target_name_override", "grpc.test"),)) as channel:
        reply = channel.unary_unary(f"/{SERVICE}/Unary")(b"tls", timeout=10)
    assert reply == b"echo:tls"


def test_no_upstream_is_unavailable(proxy, dns):
    dns.set_service("grpc-gone", "127.0.0.99")  # nothing listens there
    proxy.reconfigure(serviceName="grpc-gone", servicePath=f"/{SERVICE}", port=free_port(), upstreamProto="h2c")
    with h2c_channel(proxy) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_upstream_dying_mid_stream_ends_the_call_unavailable(proxy, dns):
    server = GrpcServer("127.0.0.46")
    try:
        route(proxy, dns, server, "grpc-dies")
        with h2c_channel(proxy) as channel:
            replies = channel.unary_stream(f"/{SERVICE}/Hang")(b"", timeout=20)
            assert next(replies) == b"first"
            assert server.hanging.wait(10)
            server.server.stop(0)  # the connection to pyroute goes away mid-call
            with pytest.raises(grpc.RpcError) as err:
                next(replies)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    finally:
        server.stop()


def test_upstream_proto_is_validated_and_kept(proxy, dns, server):
    for params, why in (({"upstreamProto": "h3"}, "upstreamProto"),
                        ({"upstreamProto": "h2"}, "sslVerifyNone"),
                        ({"upstreamProto": "h2c", "sslVerifyNone": "true"}, "cleartext"),
                        ({"upstreamProto": "h2c", "reqMode": "tcp", "srcPort": "7000"}, "reqMode")):
        st, body = proxy.admin("reconfigure", serviceName="grpc-bad", servicePath="/x", port="5000", **params)
        assert st == 400 and why in body["Message"], (params, body)
    route(proxy, dns, server, "grpc-kept")
    st, body = proxy.admin("config", {"type": "json"})
    assert st == 200 and "h2c" in str(body)


def test_request_features_apply_to_grpc_routes(proxy, dns, server):
    route(proxy, dns, server, "grpc-auth", users="alice:secret", addReqHeader="X-Meta from-proxy")
    with h2c_channel(proxy) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        with pytest.raises(grpc.RpcError) as err:
            unary(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # HTTP 401, as gRPC maps it
        reply, call = unary.with_call(b"x", timeout=10, metadata=(("authorization", "Basic YWxpY2U6c2VjcmV0"),))
        assert reply == b"echo:x"
        assert ("x-trailer", "t-from-proxy") in call.trailing_metadata()  # the header the route added


def test_upstream_proto_h2_speaks_tls_to_the_tasks(proxy, dns, ca):
    leaf = ca.issue_cert("grpc-backend.test")
    creds = grpc.ssl_server_credentials([(leaf.private_key_pem.bytes(),
                                          b"".join(b.bytes() for b in leaf.cert_chain_pems))])
    server = GrpcServer("127.0.0.49", credentials=creds)
    try:
        dns.set_service("grpc-h2tls", server.ip)
        proxy.reconfigure(serviceName="grpc-h2tls", servicePath=f"/{SERVICE}", port=server.port,
                          upstreamProto="h2", sslVerifyNone="true")
        with h2c_channel(proxy) as channel:
            assert channel.unary_unary(f"/{SERVICE}/Unary")(b"tls-up", timeout=10) == b"echo:tls-up"
            assert len(list(channel.unary_stream(f"/{SERVICE}/Stream")(b"3", timeout=10))) == 3
    finally:
        server.stop()


def test_the_com_df_label_sets_upstream_proto():
    from pyroute.controlplane.swarm import service_params
    from pyroute.services import parse_service
    params = service_params({"Spec": {"Name": "greeter", "Labels": {
        "com.df.notify": "true", "com.df.servicePath": f"/{SERVICE}", "com.df.port": "50051",
        "com.df.upstreamProto": "h2c"}}})
    assert parse_service(params).destinations[0].upstream_proto == "h2c"


def test_grpc_calls_are_counted_per_service(proxy, dns, server):
    from prometheus_client.parser import text_string_to_metric_families
    import http.client
    route(proxy, dns, server, "grpc-count")
    with h2c_channel(proxy) as channel:
        for _ in range(3):
            channel.unary_unary(f"/{SERVICE}/Unary")(b"n", timeout=10)

    def counted():
        c = http.client.HTTPConnection("127.0.0.1", proxy.admin_port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "pyroute_requests_total" and s.labels.get("service") == "grpc-count"
                   and s.labels.get("code") == "200")
    wait_until(lambda: counted() == 3, what="3 calls counted")
