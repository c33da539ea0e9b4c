//! Pub/Sub's topics and subscriptions: their names, and creating them where the
//! configuration allows it.

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::DeadLetterPolicy;

use super::PubSubConfig;
use super::errors::{is_code, rpc_error};
use crate::BrokerError;

/// Checks a Pub/Sub resource id: 3 to 255 characters, starting with a letter, of letters,
/// digits and `-_.~+%`, not starting with `goog`.
pub fn check_resource_id(kind: &str, id: &str) -> Result<(), BrokerError> {
    let legal = |c: char| c.is_ascii_alphanumeric() || "-_.~+%".contains(c);
    let ok = (3..=255).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id.chars().all(legal)
        && !id.to_ascii_lowercase().starts_with("goog");
    if ok {
        Ok(())
    } else {
        Err(BrokerError::rejected(format!(
            "{id:?} is not a valid Pub/Sub {kind} name: use 3 to 255 letters, digits or -_.~+%, \
             starting with a letter and not with \"goog\""
        )))
    }
}

/// The admin clients, shared with the subscribers' pumps so that, with `create_resources`, a
/// subscription that disappears (an emulator restarted, someone deleted it) is created again.
pub(super) struct Resources {
    pub(super) config: PubSubConfig,
    pub(super) topics: TopicAdmin,
    pub(super) subscriptions: SubscriptionAdmin,
}

impl Resources {
    /// Creates a topic unless it exists; says whether it created it.
    pub(super) async fn ensure_topic(&self, topic: &str) -> Result<bool, BrokerError> {
        check_resource_id("topic", topic)?;
        let path = self.config.topic_path(topic);
        match self.topics.create_topic().set_name(&path).send().await {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, Code::AlreadyExists) => Ok(false),
            Err(e) => Err(rpc_error(&format!("creating topic {topic:?}"), e)),
        }
    }

    /// Creates a subscription unless it exists; says whether it created it. With
    /// `exactly_once`, it is created with Pub/Sub's exactly-once delivery, and one that exists
    /// without it is refused (see [`Resources::check_subscription`]).
    pub(super) async fn ensure_subscription(
        &self,
        subscription: &str,
        topic: &str,
        exactly_once: bool,
    ) -> Result<bool, BrokerError> {
        check_resource_id("subscription", subscription)?;
        let mut request = self
            .subscriptions
            .create_subscription()
            .set_name(self.config.subscription_path(subscription))
            .set_topic(self.config.topic_path(topic))
            .set_ack_deadline_seconds(self.config.ack_deadline_s)
            // Pub/Sub refuses an exactly-once acknowledgement that overtakes an earlier
            // message of its ordering key (`TRANSIENT_FAILURE_UNORDERED_ACK_ID`, the emulator
            // taking every message without a key for one key), and a handler's workers finish
            // messages out of order: the SDK would retry those acknowledgements until the
            // earlier ones came, and a handler waiting on them stalls (measured: 1 of 10
            // confirmed after 20 s). So an exactly-once subscription keeps no order.
            .set_enable_message_ordering(!exactly_once)
            .set_enable_exactly_once_delivery(exactly_once);
        if let Some(dead_letters) = &self.config.dead_letter_topic {
            self.ensure_topic(dead_letters).await?;
            request = request.set_dead_letter_policy(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(self.config.topic_path(dead_letters))
                    .set_max_delivery_attempts(self.config.max_delivery_attempts.clamp(5, 100)),
            );
        }
        let result = request.send().await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, Code::AlreadyExists) => {
                if exactly_once {
                    self.check_subscription(subscription, true).await?;
                }
                Ok(false)
            }
            Err(e) => Err(rpc_error(
                &format!("creating subscription {subscription:?} on topic {topic:?}"),
                e,
            )),
        }
    }

    /// Checks that a subscription exists and, with `exactly_once`, that it has Pub/Sub's
    /// exactly-once delivery: without it, a confirmed acknowledgement confirms nothing (the
    /// service may deliver the message again), so an exactly-once handler must not run on it.
    pub(super) async fn check_subscription(
        &self,
        subscription: &str,
        exactly_once: bool,
    ) -> Result<(), BrokerError> {
        check_resource_id("subscription", subscription)?;
        let found = self
            .subscriptions
            .get_subscription()
            .set_subscription(self.config.subscription_path(subscription))
            .send()
            .await
            .map_err(|e| rpc_error(&format!("subscription {subscription:?}"), e))?;
        if exactly_once && !found.enable_exactly_once_delivery {
            return Err(BrokerError::config(format!(
                "subscription {subscription:?} exists without exactly-once delivery, so an \
                 exactly-once handler cannot run on it: enable it (`gcloud pubsub \
                 subscriptions update {subscription} --enable-exactly-once-delivery`), or run \
                 the handler at-least-once"
            )));
        }
        Ok(())
    }
}

pub(super) fn check_project(project: &str) -> Result<(), BrokerError> {
    let legal = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if project.is_empty() || !project.chars().all(legal) {
        return Err(BrokerError::config(format!(
            "{project:?} is not a Google Cloud project id: use lowercase letters, digits and \
             hyphens (pubsub://my-project)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_are_checked() {
        assert!(check_resource_id("topic", "requests").is_ok());
        for bad in ["ab", "1abc", "goog-topic", "has space", ""] {
            let err = check_resource_id("topic", bad).unwrap_err();
            assert!(
                err.to_string().contains("not a valid Pub/Sub topic name"),
                "{bad}: {err}"
            );
        }
        assert!(check_project("my-project-1").is_ok());
        assert!(check_project("My_Project").is_err());
    }
}
