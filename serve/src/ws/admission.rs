//! Who may open a session, and how many sessions each may hold: the server's admission
//! bookkeeping, in front of the engine's own cap.
//!
//! # What is counted
//! Every session this replica holds the engine state of has a [`SessionSlot`], in one of two
//! states:
//! - **attached**: a device is connected to it (or it was just opened). New sessions are
//!   admitted while fewer than `max_sessions` are attached.
//! - **in the grace**: its connection dropped and it waits for a `Resume`. These have their
//!   own cap (`max_resume_grace_sessions`) and do not count against new sessions, so devices
//!   that open sessions and drop their connections cannot keep honest devices out. A session
//!   that drops its connection while the grace is full is ended at once instead of waiting.
//!
//! A session is admitted only while the hidden states the engine holds for recompute take
//! less than `hidden_state_budget_mib` (the engine meters them; see
//! `Engine::hidden_state_bytes`). The budget is checked at admission, not on every input: an
//! admitted session is never cut off mid-generation, so the engine may go past the budget by
//! what the admitted sessions still send (each at most `max_prompt_tokens + max_tokens`
//! positions), and new sessions wait until finished ones give their memory back.
//!
//! A credentialed user (a device token's subject) may hold at most `max_sessions_per_user`
//! sessions, attached or in the grace; anonymous sessions (allowed only when the operator
//! does not require credentials) have no per-user count. A slot is given back when its
//! generation ends (the session then holds no engine state, though its actor may linger to
//! resend `Done`) and, at the latest, when it is dropped.
//!
//! The engine's scheduler is sized for `max_sessions + max_resume_grace_sessions`, so an
//! admitted session finds room there. (A slot is given back just before the engine frees the
//! session, so that a device told its session ended finds the slot free; only with the grace
//! full can the engine then refuse for that moment, with `overloaded` as well.)
//!
//! Invariants: the counts equal the slots alive in each state; one `std::sync::Mutex`
//! guards them (never held across an `.await`, O(1) per call).
//!
//! The counts are per replica: behind a load balancer a user may hold
//! `max_sessions_per_user` sessions on each replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::rest::store::prompts::UserId;

/// How long a device refused for capacity is asked to wait before it tries again: about the
/// time a short generation takes to finish and free its slot.
pub(crate) const CAPACITY_RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long a user at their session cap is asked to wait: their own sessions must end first.
pub(crate) const USER_CAP_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The caps, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AdmissionLimits {
    /// Sessions attached to a device.
    pub(crate) attached: usize,
    /// Sessions waiting for a `Resume`.
    pub(crate) grace: usize,
    /// Sessions of one credentialed user, attached or in the grace.
    pub(crate) per_user: usize,
    /// Bytes of hidden states held for recompute above which no session is admitted.
    pub(crate) hidden_state_bytes: u64,
}

/// Why a session was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("the cloud is at capacity ({0} sessions)")]
    Capacity(usize),
    #[error("this user already holds {0} sessions, the most allowed")]
    UserCap(usize),
    #[error("the cloud's memory for hidden states is full ({0} bytes)")]
    HiddenStateMemory(u64),
}

impl Refusal {
    /// How long the device should wait before it tries again.
    pub(crate) fn retry_after(self) -> Duration {
        match self {
            Self::Capacity(_) | Self::HiddenStateMemory(_) => CAPACITY_RETRY_AFTER,
            Self::UserCap(_) => USER_CAP_RETRY_AFTER,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    attached: usize,
    grace: usize,
    per_user: HashMap<UserId, usize>,
}

/// The admission counts of one replica.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: AdmissionLimits,
    counts: Mutex<Counts>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Attached,
    Grace,
    Released,
}

/// One admitted session's place in the counts.
#[derive(Debug)]
pub(crate) struct SessionSlot {
    admission: Arc<Admission>,
    user: Option<UserId>,
    state: SlotState,
}

impl Admission {
    pub(crate) fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes an attached slot for a new session of `user` (`None`: anonymous), while the
    /// engine holds `hidden_bytes` of hidden states.
    pub(crate) fn admit(
        self: &Arc<Self>,
        user: Option<&UserId>,
        hidden_bytes: u64,
    ) -> Result<SessionSlot, Refusal> {
        if hidden_bytes >= self.limits.hidden_state_bytes {
            return Err(Refusal::HiddenStateMemory(self.limits.hidden_state_bytes));
        }
        let mut c = self.lock();
        if let Some(u) = user {
            if c.per_user.get(u).copied().unwrap_or(0) >= self.limits.per_user {
                return Err(Refusal::UserCap(self.limits.per_user));
            }
        }
        if c.attached >= self.limits.attached {
            return Err(Refusal::Capacity(self.limits.attached));
        }
        c.attached += 1;
        if let Some(u) = user {
            *c.per_user.entry(u.clone()).or_insert(0) += 1;
        }
        Ok(SessionSlot {
            admission: self.clone(),
            user: user.cloned(),
            state: SlotState::Attached,
        })
    }

    /// (attached, in the grace, users with a session): for tests.
    #[cfg(test)]
    fn snapshot(&self) -> (usize, usize, usize) {
        let c = self.lock();
        (c.attached, c.grace, c.per_user.len())
    }
}

impl SessionSlot {
    /// The device dropped its connection: the session moves to the grace. `false` when the
    /// grace is full (the slot stays attached; the caller ends the session).
    pub(crate) fn move_to_grace(&mut self) -> bool {
        if self.state != SlotState::Attached {
            return true;
        }
        let mut c = self.admission.lock();
        if c.grace >= self.admission.limits.grace {
            return false;
        }
        c.attached -= 1;
        c.grace += 1;
        self.state = SlotState::Grace;
        true
    }

    /// A device resumed the session. It may take the attached count over `max_sessions`
    /// for a while: the session already holds its engine state, and refusing it would
    /// waste that.
    pub(crate) fn move_to_attached(&mut self) {
        if self.state != SlotState::Grace {
            return;
        }
        let mut c = self.admission.lock();
        c.grace -= 1;
        c.attached += 1;
        self.state = SlotState::Attached;
    }

    /// The session holds no engine state any more: gives the slot back (idempotent).
    pub(crate) fn release(&mut self) {
        let mut c = self.admission.lock();
        match self.state {
            SlotState::Attached => c.attached -= 1,
            SlotState::Grace => c.grace -= 1,
            SlotState::Released => return,
        }
        self.state = SlotState::Released;
        if let Some(u) = &self.user {
            if let Some(n) = c.per_user.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    c.per_user.remove(u);
                }
            }
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).expect("user")
    }

    #[test]
    fn grace_sessions_have_their_own_cap_and_users_theirs() {
        let a = Admission::new(AdmissionLimits {
            attached: 2,
            grace: 1,
            per_user: 2,
            hidden_state_bytes: u64::MAX,
        });
        let alice = user("alice");
        let mut s1 = a.admit(Some(&alice), 0).expect("first");
        let s2 = a.admit(Some(&alice), 0).expect("second");
        assert_eq!(a.admit(Some(&alice), 0).err(), Some(Refusal::UserCap(2)));
        assert_eq!(a.admit(None, 0).err(), Some(Refusal::Capacity(2)));
        // One drops its connection: a new session fits, the grace is full.
        assert!(s1.move_to_grace());
        assert_eq!(a.snapshot(), (1, 1, 1));
        let mut anon = a.admit(None, 0).expect("grace does not count");
        assert!(!anon.move_to_grace(), "the grace is full");
        // Alice still holds two sessions, one of them in the grace.
        assert_eq!(a.admit(Some(&alice), 0).err(), Some(Refusal::UserCap(2)));
        s1.move_to_attached();
        assert_eq!(
            a.snapshot(),
            (3, 0, 1),
            "a resume may pass the attached cap"
        );
        drop(s2);
        s1.release();
        s1.release();
        drop(s1);
        anon.release();
        assert_eq!(a.snapshot(), (0, 0, 0));
        assert_eq!(
            Refusal::Capacity(1).retry_after(),
            CAPACITY_RETRY_AFTER,
            "refusals carry a retry_after"
        );
    }

    #[test]
    fn no_session_is_admitted_while_the_hidden_states_fill_their_budget() {
        let a = Admission::new(AdmissionLimits {
            attached: 4,
            grace: 1,
            per_user: 4,
            hidden_state_bytes: 8 << 20,
        });
        let first = a.admit(None, (8 << 20) - 1).expect("under the budget");
        assert_eq!(
            a.admit(None, 8 << 20).err(),
            Some(Refusal::HiddenStateMemory(8 << 20))
        );
        assert_eq!(a.snapshot(), (1, 0, 0), "a refusal takes no slot");
        assert_eq!(
            Refusal::HiddenStateMemory(8 << 20).retry_after(),
            CAPACITY_RETRY_AFTER
        );
        drop(first);
        a.admit(None, 0).expect("memory given back");
    }
}
