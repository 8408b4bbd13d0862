//! W3C trace context (`traceparent`) carried in Kafka headers, so one webhook can be followed
//! through every stage to the FHIR write in the logs (`trace_id` fields).
//!
//! The gateway starts a trace per webhook (or continues the caller's `traceparent`); every
//! stage's outputs carry the trace of the input they came from, each record a new span id.
//! Parsing is OpenTelemetry's W3C propagator; ids come from its random generator.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

/// The header (HTTP and Kafka) that carries the trace context.
pub const HEADER: &str = "traceparent";

/// One record's place in a trace.
#[derive(Debug, Clone)]
pub struct Trace(SpanContext);

/// The same trace, span and flags (wherever the context came from).
impl PartialEq for Trace {
    fn eq(&self, other: &Self) -> bool {
        self.0.trace_id() == other.0.trace_id()
            && self.0.span_id() == other.0.span_id()
            && self.0.trace_flags() == other.0.trace_flags()
    }
}

struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == HEADER).then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec![HEADER]
    }
}

impl Trace {
    /// Starts a new trace (sampled: ohx records every trace id it logs).
    pub fn root() -> Self {
        let ids = RandomIdGenerator::default();
        Trace(SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ))
    }

    /// Parses a `traceparent` value; `None` if it is not a valid W3C trace context.
    pub fn parse(value: &str) -> Option<Self> {
        // The propagator reads ids as numbers and takes shorter ones: the field widths first.
        let widths: Vec<usize> = value.trim().split('-').map(str::len).take(4).collect();
        if widths != [2, 32, 16, 2] {
            return None;
        }
        let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &One(value));
        let span = cx.span().span_context().clone();
        span.is_valid().then_some(Trace(span))
    }

    /// The trace of a Kafka record, from its `traceparent` header.
    pub fn from_headers(headers: &[(String, Vec<u8>)]) -> Option<Self> {
        headers
            .iter()
            .rev()
            .find(|(k, _)| k == HEADER)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(Self::parse)
    }

    /// A new span of the same trace (a record derived from this one).
    pub fn child(&self) -> Self {
        Trace(SpanContext::new(
            self.0.trace_id(),
            RandomIdGenerator::default().new_span_id(),
            self.0.trace_flags(),
            false,
            TraceState::default(),
        ))
    }

    /// The trace id as logged (32 lowercase hex digits).
    pub fn trace_id(&self) -> String {
        self.0.trace_id().to_string()
    }

    /// The `traceparent` value.
    pub fn header_value(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.0.trace_id(),
            self.0.span_id(),
            self.0.trace_flags() & TraceFlags::SAMPLED
        )
    }

    /// The Kafka header.
    pub fn header(&self) -> (String, Vec<u8>) {
        (HEADER.to_string(), self.header_value().into_bytes())
    }
}

/// The `trace_id` of a record's headers, or empty (for log fields).
pub fn trace_id_of(headers: &[(String, Vec<u8>)]) -> String {
    Trace::from_headers(headers)
        .map(|t| t.trace_id())
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const W3C_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn test_parse_reads_the_w3c_example_and_writes_it_back() {
        let t = Trace::parse(W3C_EXAMPLE).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.header_value(), W3C_EXAMPLE);
    }

    #[test]
    fn test_parse_refuses_malformed_and_all_zero_ids() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(Trace::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent = Trace::parse(W3C_EXAMPLE).unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.header_value(), parent.header_value());
        assert!(child.header_value().ends_with("-01"));
        // round-trips through its own header
        assert_eq!(Trace::parse(&child.header_value()), Some(child));
    }

    #[test]
    fn test_roots_are_valid_sampled_and_distinct() {
        let a = Trace::root();
        let b = Trace::root();
        assert_ne!(a.trace_id(), b.trace_id());
        assert!(a.header_value().ends_with("-01"));
        assert_eq!(Trace::parse(&a.header_value()), Some(a));
    }

    #[test]
    fn test_from_headers_reads_the_last_traceparent_and_ignores_others() {
        let headers = vec![
            ("other".to_string(), b"x".to_vec()),
            (HEADER.to_string(), b"not a trace".to_vec()),
            (HEADER.to_string(), W3C_EXAMPLE.as_bytes().to_vec()),
        ];
        assert_eq!(trace_id_of(&headers), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id_of(&headers[..2]), "");
        assert!(Trace::from_headers(&[(HEADER.into(), vec![0xff, 0xfe])]).is_none());
    }
}
