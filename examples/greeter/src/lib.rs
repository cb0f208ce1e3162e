//! The generated code of `greeter.v1` (client and server), for the example
//! binary `reload-greeter` and for the tests that call it.

#![forbid(unsafe_code)]

pub mod v1 {
    tonic::include_proto!("greeter.v1");
}
