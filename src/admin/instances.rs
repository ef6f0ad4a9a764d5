//! `/instances`: the llama-server processes kvgate runs (create, list,
//! show, start, stop, delete, the tail of their output), behind the admin
//! key since they start processes.

use hyper::StatusCode;
use serde_json::Value;

use crate::http::body::json_response;
use crate::http::error::{ApiError, ErrorType};
use crate::instances::{InstanceError, Instances};

use super::request::{json_ok, Answer};

/// What `/instances/{id}/…` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// `GET /instances`.
    List,
    /// `POST /instances`.
    Create,
    /// `GET /instances/{id}`.
    Show,
    /// `POST /instances/{id}/start`.
    Start,
    /// `POST /instances/{id}/stop`.
    Stop,
    /// `DELETE /instances/{id}`.
    Delete,
    /// `GET /instances/{id}/log`.
    Log,
}

/// The instances API needs an admin key: it starts processes.
pub(crate) fn key_required() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorType::Authentication,
        "the instances API requires an admin key: start kvgate with --admin-key or --admin-key-file",
    )
}

/// Does `action` on instance `id` (empty for the collection).
pub(crate) async fn act(instances: &Instances, action: Action, id: &str, body: &Value) -> Answer {
    let done = match action {
        Action::List => return Ok(json_ok(&instances.all())),
        Action::Create => {
            let created = instances.create(body).await.map_err(instance_error)?;
            return Ok(json_response(StatusCode::CREATED, &created));
        }
        Action::Show => instances.show(id),
        Action::Start => instances.start(id).await,
        Action::Stop => instances.stop(id).await,
        Action::Delete => instances.delete(id).await,
        Action::Log => instances.log(id),
    };
    done.map(|v| json_ok(&v)).map_err(instance_error)
}

/// The status each refusal of the instances API gets.
fn instance_error(e: InstanceError) -> ApiError {
    let status = match &e {
        InstanceError::BadRequest(_) => StatusCode::BAD_REQUEST,
        InstanceError::NotFound(_) => StatusCode::NOT_FOUND,
        InstanceError::Busy(..) => StatusCode::CONFLICT,
        InstanceError::NoSaveDir => StatusCode::NOT_IMPLEMENTED,
        InstanceError::Closing => StatusCode::SERVICE_UNAVAILABLE,
        InstanceError::Start(_) | InstanceError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let kind = match status {
        StatusCode::INTERNAL_SERVER_ERROR => ErrorType::Server,
        StatusCode::NOT_FOUND => ErrorType::NotFound,
        StatusCode::NOT_IMPLEMENTED => ErrorType::NotSupported,
        StatusCode::SERVICE_UNAVAILABLE => ErrorType::Unavailable,
        _ => ErrorType::InvalidRequest,
    };
    ApiError::new(status, kind, e.to_string())
}
