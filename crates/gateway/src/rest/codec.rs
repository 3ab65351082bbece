//! grpc-gateway's wire format, as etcd's `/v3` HTTP API shows it: protobuf JSON
//! bodies (the generated pbjson impls of `concord-proto`), gRPC statuses turned into
//! HTTP statuses and error bodies, newline-delimited `{"result":…}` streams, and the
//! HTTP headers a call's gRPC metadata comes from.

use std::pin::Pin;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// What the gateway's answers are.
const JSON: &str = "application/json";

/// A body, or a streamed request's concatenated JSON objects, larger than this is
/// refused before it is decoded: four times the largest gRPC message, room for the
/// base64 and escapes of any request gRPC would take.
pub(super) fn body_limit(max_message: usize) -> usize {
    max_message.saturating_mul(4)
}

/// grpc-gateway's `HTTPStatusFromCode`.
pub(super) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// grpc-gateway's error body for a call that failed before any answer.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: i32,
    message: &'a str,
}

/// grpc-gateway's error object inside a stream that failed after it started.
#[derive(Serialize)]
struct StreamError<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

#[derive(Serialize)]
struct StreamErrorChunk<'a> {
    error: StreamError<'a>,
}

#[derive(Serialize)]
struct ResultChunk<'a, T> {
    result: &'a T,
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    r
}

/// A successful answer also carries the gRPC call's response metadata, as
/// grpc-gateway forwards it.
fn with_grpc_metadata(mut r: Response) -> Response {
    r.headers_mut().insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    r
}

/// A plain-text answer of the gateway's router (unknown path, wrong method), as
/// Go's `http.Error` writes it.
pub(super) fn text(status: StatusCode, msg: &str) -> Response {
    let mut r = (status, format!("{msg}\n")).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    // Serialising a generated message or one of the shapes above cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// A failed call: its HTTP status and grpc-gateway's error body.
pub(super) fn error(status: &Status) -> Response {
    let body = ErrorBody {
        error: status.message(),
        code: status.code() as i32,
        message: status.message(),
    };
    json_response(http_status(status.code()), to_json(&body))
}

/// A unary answer.
pub(super) fn ok<T: Serialize>(msg: &T) -> Response {
    with_grpc_metadata(json_response(StatusCode::OK, to_json(msg)))
}

/// The newline-terminated line of one streamed answer.
fn result_line<T: Serialize>(msg: &T) -> Bytes {
    let mut v = to_json(&ResultChunk { result: msg });
    v.push(b'\n');
    Bytes::from(v)
}

/// A stream's error, its last line (grpc-gateway ends it with no newline).
fn error_line(status: &Status) -> Bytes {
    let http = http_status(status.code());
    let v = to_json(&StreamErrorChunk {
        error: StreamError {
            grpc_code: status.code() as i32,
            http_code: http.as_u16(),
            message: status.message(),
            http_status: http.canonical_reason().unwrap_or(""),
        },
    });
    Bytes::from(v)
}

pub(super) type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A streamed answer, as grpc-gateway writes it: nothing is sent until the first
/// answer; if that is an error, the HTTP status is the error's, else 200 and one
/// `{"result":…}` line per answer, and a failure later on ends the body with an
/// `{"error":…}` line.
pub(super) async fn stream<T: Serialize + Send + 'static>(mut answers: Answers<T>) -> Response {
    let status = match answers.next().await {
        None => StatusCode::OK,
        Some(Ok(first)) => {
            let head = tokio_stream::once(Ok::<_, std::convert::Infallible>(result_line(&first)));
            // The stream ends at its first error, which is its last line.
            let mut ended = false;
            let rest = answers.map_while(move |a| {
                if ended {
                    return None;
                }
                Some(Ok(match a {
                    Ok(m) => result_line(&m),
                    Err(s) => {
                        ended = true;
                        error_line(&s)
                    }
                }))
            });
            let mut r = Response::new(Body::from_stream(head.chain(rest)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
            return with_grpc_metadata(r);
        }
        Some(Err(s)) => {
            return json_response(http_status(s.code()), error_line(&s).to_vec());
        }
    };
    json_response(status, Vec::new())
}

/// The JSON of a whole body, or a refusal with grpc-gateway's status once it passes
/// `limit` bytes.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, Status> {
    let mut chunks = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(c) = chunks.next().await {
        let c = c.map_err(|e| Status::invalid_argument(e.to_string()))?;
        if buf.len() + c.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&c);
    }
    Ok(Bytes::from(buf))
}

/// Decodes a unary request as grpc-gateway does: the body's first JSON value (what
/// follows it is not read); an empty body is the empty message.
pub(super) fn decode<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    match values.next() {
        None => Ok(T::default()),
        Some(Ok(v)) => from_value(v),
        Some(Err(e)) => Err(syntax_error(&e)),
    }
}

fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, Status> {
    serde_json::from_value(v).map_err(|e| Status::invalid_argument(go_text(&e.to_string())))
}

fn syntax_error(e: &serde_json::Error) -> Status {
    if e.is_eof() {
        Status::invalid_argument("unexpected EOF")
    } else {
        let text = e.to_string();
        let text = text.split(" at line ").next().unwrap_or(&text);
        Status::invalid_argument(format!("invalid character: {text}"))
    }
}

/// A decoding error in the words of Go's `encoding/json` and `encoding/base64`,
/// which etcd's gateway answers with, for the errors clients meet: a value of the
/// wrong JSON type, a body that is not an object, and bad base64.
fn go_text(serde: &str) -> String {
    let serde = serde.split(" at line ").next().unwrap_or(serde);
    if let Some(rest) = serde.strip_prefix("invalid type: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let kind = match found.split_whitespace().next().unwrap_or("") {
            "integer" | "floating" => "number",
            "string" => "string",
            "boolean" => "bool",
            "sequence" => "array",
            "map" => "object",
            "null" => "null",
            other => other,
        };
        let target = if expected.contains("base64") {
            "[]uint8"
        } else if expected.starts_with("struct") {
            "map[string]json.RawMessage"
        } else if expected.contains("a string") {
            "string"
        } else if expected.contains("boolean") {
            "bool"
        } else if expected.contains("sequence") {
            "[]json.RawMessage"
        } else {
            "int64"
        };
        return format!("json: cannot unmarshal {kind} into Go value of type {target}");
    }
    if let Some(offset) = base64_offset(serde) {
        return format!("illegal base64 data at input byte {offset}");
    }
    if let Some(text) = unknown_enum_value(serde) {
        return text;
    }
    serde.to_string()
}

/// The Go names of the API's enums, by the names of their values.
const ENUMS: &[(&str, &[&str])] = &[
    ("authpb.Permission_Type", &["READ", "WRITE", "READWRITE"]),
    (
        "etcdserverpb.RangeRequest_SortOrder",
        &["NONE", "ASCEND", "DESCEND"],
    ),
    (
        "etcdserverpb.RangeRequest_SortTarget",
        &["KEY", "VERSION", "CREATE", "MOD", "VALUE"],
    ),
    (
        "etcdserverpb.Compare_CompareResult",
        &["EQUAL", "GREATER", "LESS", "NOT_EQUAL"],
    ),
    (
        "etcdserverpb.Compare_CompareTarget",
        &["VERSION", "CREATE", "MOD", "VALUE", "LEASE"],
    ),
    ("etcdserverpb.AlarmType", &["NONE", "NOSPACE", "CORRUPT"]),
    (
        "etcdserverpb.AlarmRequest_AlarmAction",
        &["GET", "ACTIVATE", "DEACTIVATE"],
    ),
    (
        "etcdserverpb.WatchCreateRequest_FilterType",
        &["NOPUT", "NODELETE"],
    ),
];

/// Go's text for an enum value name that names none (serde: "unknown variant `X`,
/// expected one of `A`, `B`").
fn unknown_enum_value(serde: &str) -> Option<String> {
    let rest = serde.strip_prefix("unknown variant `")?;
    let (value, expected) = rest.split_once('`')?;
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let (go, _) = ENUMS
        .iter()
        .find(|(_, values)| *values == names.as_slice())?;
    Some(format!("unknown value \"{value}\" for enum {go}"))
}

/// The input offset of a base64 decoding error's text, if it is one.
fn base64_offset(text: &str) -> Option<usize> {
    if !text.to_ascii_lowercase().contains("invalid") {
        return None;
    }
    let at = text.find("offset ")?;
    text[at + 7..]
        .trim_end_matches('.')
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A request that has fully decoded must also fit what gRPC would have taken.
pub(super) fn check_message_size<T: prost::Message>(msg: &T, max: usize) -> Result<(), Status> {
    let n = msg.encoded_len();
    if n > max {
        return Err(Status::resource_exhausted(format!(
            "grpc: received message larger than max ({n} vs. {max})"
        )));
    }
    Ok(())
}

/// The requests of a streamed call: the JSON values of the body, one after another,
/// each decoded as it completes (read on a task of its own, so answers flow while the
/// client still sends). A value that does not decode, or a body beyond `limit`, ends
/// the requests with the error.
pub(super) fn requests<T>(body: Body, limit: usize, max_message: usize) -> Answers<T>
where
    T: DeserializeOwned + prost::Message + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut chunks = body.into_data_stream();
        let mut buf = Vec::<u8>::new();
        let mut seen = 0usize;
        loop {
            loop {
                let mut values =
                    serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
                let out = match values.next() {
                    Some(Ok(v)) => {
                        let used = values.byte_offset();
                        buf.drain(..used);
                        from_value::<T>(v)
                            .and_then(|m| check_message_size(&m, max_message).map(|()| m))
                    }
                    Some(Err(e)) if !e.is_eof() => Err(syntax_error(&e)),
                    _ => break,
                };
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    return;
                }
            }
            match chunks.next().await {
                Some(Ok(c)) => {
                    seen += c.len();
                    if seen > limit {
                        let _ = tx.send(Err(too_large())).await;
                        return;
                    }
                    buf.extend_from_slice(&c);
                }
                // The client went away.
                Some(Err(_)) => return,
                None => {
                    if !buf.iter().all(u8::is_ascii_whitespace) {
                        let _ = tx
                            .send(Err(Status::invalid_argument("unexpected EOF")))
                            .await;
                    }
                    return;
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn too_large() -> Status {
    Status::resource_exhausted("grpc: received message larger than max")
}

/// The gRPC metadata of a call made through the gateway: grpc-gateway passes
/// `Grpc-Metadata-<name>` headers as `<name>`, and `Authorization` as
/// `authorization` (where etcd's auth layer, like the gRPC `token`, finds a token).
pub(super) fn metadata(headers: &HeaderMap) -> MetadataMap {
    let mut m = MetadataMap::new();
    for (name, value) in headers {
        let name = name.as_str();
        let key = if name == "authorization" {
            Some("authorization")
        } else {
            name.strip_prefix("grpc-metadata-")
        };
        let Some(key) = key else { continue };
        if key.ends_with("-bin") {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_bytes()),
        ) {
            m.append(k, v);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_proto::etcdserverpb::{
        PutRequest, RangeResponse, ResponseHeader, WatchRequest, watch_request::RequestUnion,
    };
    use concord_proto::mvccpb::KeyValue;

    #[test]
    fn messages_are_written_as_grpc_gateway_writes_them() {
        let r = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 3,
                raft_term: 0,
            }),
            kvs: vec![KeyValue {
                key: b"foo".to_vec(),
                value: b"bar".to_vec(),
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        let got = String::from_utf8(to_json(&r)).unwrap();
        assert_eq!(
            got,
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"3"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"2","value":"YmFy"}],"count":"1"}"#
        );
    }

    #[test]
    fn an_unknown_enum_value_is_named_as_go_names_it() {
        let e = decode::<concord_proto::etcdserverpb::AuthRoleGrantPermissionRequest>(
            br#"{"name":"r","perm":{"permType":"BOGUS"}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.message(),
            r#"unknown value "BOGUS" for enum authpb.Permission_Type"#
        );
        let e = decode::<concord_proto::etcdserverpb::RangeRequest>(br#"{"sort_order":"UP"}"#)
            .unwrap_err();
        assert_eq!(
            e.message(),
            r#"unknown value "UP" for enum etcdserverpb.RangeRequest_SortOrder"#
        );
    }

    #[test]
    fn a_unary_body_is_its_first_value_and_an_empty_body_the_empty_message() {
        let p: PutRequest =
            decode(br#"{"key":"Zm9v","value":"YmFy","lease":"7"} trailing"#).unwrap();
        assert_eq!(
            (p.key.as_slice(), p.value.as_slice(), p.lease),
            (&b"foo"[..], &b"bar"[..], 7)
        );
        let p: PutRequest = decode(br#"{"lease":7}"#).unwrap();
        assert_eq!(p.lease, 7, "int64 fields take numbers too");
        assert_eq!(decode::<PutRequest>(b"").unwrap(), PutRequest::default());
        assert_eq!(
            decode::<PutRequest>(b"  \n").unwrap(),
            PutRequest::default()
        );
    }

    #[test]
    fn bad_bodies_are_invalid_arguments_in_gos_words() {
        let text = |body: &[u8]| {
            let e = decode::<PutRequest>(body).unwrap_err();
            assert_eq!(
                e.code(),
                Code::InvalidArgument,
                "{}",
                String::from_utf8_lossy(body)
            );
            e.message().to_string()
        };
        assert_eq!(text(b"{"), "unexpected EOF");
        assert_eq!(
            text(b"{\"key\":5}"),
            "json: cannot unmarshal number into Go value of type []uint8"
        );
        assert_eq!(
            text(b"[1]"),
            "json: cannot unmarshal array into Go value of type map[string]json.RawMessage"
        );
        assert_eq!(
            text(b"{\"key\":\"!!!\"}"),
            "illegal base64 data at input byte 0"
        );
        // Unknown fields are ignored, as etcd's gateway ignores them.
        let p: PutRequest = decode(b"{\"foo\":\"YQ==\",\"key\":\"YQ==\"}").unwrap();
        assert_eq!(p.key, b"a");
    }

    #[test]
    fn errors_carry_grpc_gateways_body_and_status() {
        let r = error(&Status::out_of_range(
            "etcdserver: mvcc: required revision is a future revision",
        ));
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        let line = error_line(&Status::not_found("etcdserver: requested lease not found"));
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"error\":{\"grpc_code\":5,\"http_code\":404,\"message\":\"etcdserver: requested lease not found\",\"http_status\":\"Not Found\"}}"
        );
    }

    #[tokio::test]
    async fn streamed_requests_are_split_however_the_body_arrives() {
        let text = b"{\"create_request\":{\"key\":\"YQ==\"}}\n{\"progress_request\":{}} {\"cancel_request\":{\"watch_id\":\"3\"}}";
        // One byte per chunk: every value spans chunks.
        let chunks: Vec<Result<Bytes, std::io::Error>> = text
            .iter()
            .map(|b| Ok(Bytes::copy_from_slice(&[*b])))
            .collect();
        let body = Body::from_stream(tokio_stream::iter(chunks));
        let got: Vec<_> = requests::<WatchRequest>(body, 1 << 20, 1 << 20)
            .collect()
            .await;
        assert_eq!(got.len(), 3);
        let unions: Vec<_> = got
            .into_iter()
            .map(|r| r.unwrap().request_union.unwrap())
            .collect();
        assert!(matches!(&unions[0], RequestUnion::CreateRequest(c) if c.key == b"a"));
        assert!(matches!(&unions[1], RequestUnion::ProgressRequest(_)));
        assert!(matches!(&unions[2], RequestUnion::CancelRequest(c) if c.watch_id == 3));
    }

    #[tokio::test]
    async fn a_bad_or_oversized_streamed_request_ends_the_requests() {
        let body = Body::from(
            "{\"create_request\":{}}\n{\"create_request\":{\"key\":5}}\n{\"progress_request\":{}}",
        );
        let got: Vec<_> = requests::<WatchRequest>(body, 1 << 20, 1 << 20)
            .collect()
            .await;
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert_eq!(got[1].as_ref().unwrap_err().code(), Code::InvalidArgument);

        let big = format!(
            "{{\"create_request\":{{\"key\":\"{}\"}}}}",
            "QUFB".repeat(100)
        );
        let got: Vec<_> = requests::<WatchRequest>(Body::from(big), 64, 1 << 20)
            .collect()
            .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::ResourceExhausted);

        let cut = Body::from("{\"create_request\":{\"key\":");
        let got: Vec<_> = requests::<WatchRequest>(cut, 1 << 20, 1 << 20)
            .collect()
            .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::InvalidArgument);
    }
}
