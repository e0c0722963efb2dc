//! Every rule of the presence model, without a runtime.

use super::*;
use crate::domain::transition::next_version;

const LIMITS: Limits = Limits {
    max_sessions_per_user: 3,
};

fn session(device: &str, conn_id: u64, activity: Activity) -> Session {
    Session {
        device_id: device.to_owned(),
        platform: Platform::Ios,
        activity,
        connected_since_ms: 0,
        conn_id,
        node_id: "n1".to_owned(),
    }
}

fn open(
    record: &mut UserRecord,
    device: &str,
    conn_id: u64,
    activity: Activity,
    now: i64,
) -> Applied {
    let mutation = Mutation::Open {
        session: session(device, conn_id, activity),
        status: None,
    };
    apply(record, mutation, now, LIMITS).unwrap()
}

fn set_status(record: &mut UserRecord, chosen: ChosenStatus, message: &str, now: i64) -> Applied {
    let mutation = Mutation::SetStatus {
        chosen,
        custom_message: message.to_owned(),
    };
    apply(record, mutation, now, LIMITS).unwrap()
}

fn end(
    record: &mut UserRecord,
    device: &str,
    conn_id: Option<u64>,
    reason: OfflineReason,
    now: i64,
) -> Applied {
    let mutation = Mutation::End {
        device_id: device.to_owned(),
        conn_id,
        reason,
    };
    apply(record, mutation, now, LIMITS).unwrap()
}

#[test]
fn derived_status_follows_the_rules_for_every_combination() {
    let activities = [None, Some(Activity::Active), Some(Activity::Idle)];
    for chosen in [
        ChosenStatus::Online,
        ChosenStatus::Busy,
        ChosenStatus::Invisible,
    ] {
        for first in activities {
            for second in activities {
                let sessions: Vec<Session> = [first, second]
                    .iter()
                    .enumerate()
                    .filter_map(|(i, a)| a.map(|a| session(&format!("d{i}"), i as u64, a)))
                    .collect();
                let any_active = sessions.iter().any(|s| s.activity == Activity::Active);
                let record = UserRecord {
                    sessions: sessions.clone(),
                    chosen,
                    ..UserRecord::default()
                };
                let expected = if sessions.is_empty() || chosen == ChosenStatus::Invisible {
                    VisibleStatus::Offline
                } else if chosen == ChosenStatus::Busy {
                    VisibleStatus::Busy
                } else if any_active {
                    VisibleStatus::Online
                } else {
                    VisibleStatus::Idle
                };
                assert_eq!(
                    record.derived_status(),
                    expected,
                    "{chosen:?} {first:?} {second:?}"
                );
            }
        }
    }
}

#[test]
fn first_open_makes_the_user_online_with_a_version() {
    let mut record = UserRecord::default();
    let applied = open(&mut record, "phone", 1, Activity::Active, 1_000);
    assert!(applied.shown_changed && applied.record_changed);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    assert_eq!(record.shown.last_seen_ms, 1_000);
    assert!(record.shown.version > 0);
    assert_eq!(record.shown.offline_reason, None);
}

#[test]
fn idle_phone_and_active_laptop_is_online_and_both_idle_is_idle() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Idle, 1_000);
    assert_eq!(record.shown.status, VisibleStatus::Idle);
    open(&mut record, "laptop", 2, Activity::Active, 2_000);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    let laptop_idle = Mutation::Update {
        session: session("laptop", 2, Activity::Active),
        activity: Some(Activity::Idle),
        status: None,
    };
    apply(&mut record, laptop_idle, 3_000, LIMITS).unwrap();
    assert_eq!(record.shown.status, VisibleStatus::Idle);
}

#[test]
fn busy_wins_over_activity_and_carries_the_message() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Idle, 1_000);
    set_status(&mut record, ChosenStatus::Busy, "in a meeting", 2_000);
    assert_eq!(record.shown.status, VisibleStatus::Busy);
    assert_eq!(record.shown.custom_message, "in a meeting");
}

#[test]
fn every_visible_change_bumps_the_version_and_nothing_else_does() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    let v1 = record.shown.version;
    // A second active device changes nothing others see.
    let applied = open(&mut record, "laptop", 2, Activity::Active, 1_000);
    assert!(applied.record_changed && !applied.shown_changed);
    assert_eq!(record.shown.version, v1);
    // A message change is visible, even within the same millisecond.
    set_status(&mut record, ChosenStatus::Online, "hi", 1_000);
    assert!(record.shown.version > v1);
}

#[test]
fn versions_increase_strictly_and_follow_the_clock() {
    assert_eq!(next_version(0, 5), 5_000);
    assert_eq!(next_version(5_000, 5), 5_001);
    assert_eq!(next_version(9_999_999, 5), 10_000_000);
    assert_eq!(next_version(7, -1), 8);
}

#[test]
fn last_device_leaving_goes_offline_with_the_reason() {
    for reason in [
        OfflineReason::Logout,
        OfflineReason::ConnectionClosed,
        OfflineReason::LeaseExpired,
    ] {
        let mut record = UserRecord::default();
        open(&mut record, "phone", 1, Activity::Active, 1_000);
        open(&mut record, "laptop", 2, Activity::Active, 1_000);
        let applied = end(&mut record, "phone", Some(1), reason, 2_000);
        assert!(!applied.shown_changed, "one device left: still online");
        end(&mut record, "laptop", Some(2), reason, 3_000);
        assert_eq!(record.shown.status, VisibleStatus::Offline);
        assert_eq!(record.shown.offline_reason, Some(reason));
        assert_eq!(record.shown.last_seen_ms, 3_000);
        assert!(record.sessions.is_empty());
    }
}

#[test]
fn lost_node_ends_only_its_own_sessions() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    let mut other = session("laptop", 2, Activity::Idle);
    other.node_id = "n2".into();
    apply(
        &mut record,
        Mutation::Open {
            session: other,
            status: None,
        },
        1_000,
        LIMITS,
    )
    .unwrap();
    apply(
        &mut record,
        Mutation::EndNode {
            node_id: "n1".into(),
        },
        2_000,
        LIMITS,
    )
    .unwrap();
    assert_eq!(record.shown.status, VisibleStatus::Idle);
    apply(
        &mut record,
        Mutation::EndNode {
            node_id: "n2".into(),
        },
        3_000,
        LIMITS,
    )
    .unwrap();
    assert_eq!(record.shown.offline_reason, Some(OfflineReason::NodeLost));
}

#[test]
fn a_late_close_of_an_old_connection_does_not_end_the_reconnected_session() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    let version = record.shown.version;
    let applied = open(&mut record, "phone", 2, Activity::Active, 1_500);
    assert!(
        !applied.shown_changed,
        "a reconnect is no change to contacts"
    );
    let applied = end(
        &mut record,
        "phone",
        Some(1),
        OfflineReason::ConnectionClosed,
        2_000,
    );
    assert!(!applied.record_changed);
    assert_eq!(record.shown.version, version);
    assert_eq!(record.sessions[0].conn_id, 2);
}

#[test]
fn a_reconnect_keeps_when_the_session_started() {
    let mut record = UserRecord::default();
    let mut first = session("phone", 1, Activity::Active);
    first.connected_since_ms = 1_000;
    apply(
        &mut record,
        Mutation::Open {
            session: first,
            status: None,
        },
        1_000,
        LIMITS,
    )
    .unwrap();
    let mut again = session("phone", 2, Activity::Active);
    again.connected_since_ms = 9_000;
    apply(
        &mut record,
        Mutation::Open {
            session: again,
            status: None,
        },
        9_000,
        LIMITS,
    )
    .unwrap();
    assert_eq!(record.sessions[0].connected_since_ms, 1_000);
}

#[test]
fn a_reopen_takes_the_activity_the_device_reopens_with() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Idle, 1_000);
    assert_eq!(record.shown.status, VisibleStatus::Idle);
    open(&mut record, "phone", 2, Activity::Active, 2_000);
    assert_eq!(record.sessions[0].activity, Activity::Active);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    open(&mut record, "phone", 3, Activity::Idle, 3_000);
    assert_eq!(record.shown.status, VisibleStatus::Idle);
}

#[test]
fn an_update_from_a_replaced_connection_is_refused_and_changes_nothing() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    open(&mut record, "phone", 2, Activity::Active, 1_000);
    let before = record.clone();
    let stale = Mutation::Update {
        session: session("phone", 1, Activity::Active),
        activity: Some(Activity::Idle),
        status: None,
    };
    assert_eq!(
        apply(&mut record, stale, 2_000, LIMITS),
        Err(TransitionError::SessionReplaced)
    );
    assert_eq!(record, before);
}

#[test]
fn an_update_puts_back_a_session_the_store_forgot() {
    let mut record = UserRecord::default();
    let update = Mutation::Update {
        session: session("phone", 7, Activity::Active),
        activity: None,
        status: None,
    };
    let applied = apply(&mut record, update, 1_000, LIMITS).unwrap();
    assert!(applied.shown_changed);
    assert_eq!(record.shown.status, VisibleStatus::Online);
}

#[test]
fn too_many_devices_are_refused_but_reconnects_are_not() {
    let mut record = UserRecord::default();
    for i in 0..3 {
        open(&mut record, &format!("d{i}"), i, Activity::Active, 1_000);
    }
    let before = record.clone();
    let fourth = Mutation::Open {
        session: session("d3", 9, Activity::Active),
        status: None,
    };
    assert_eq!(
        apply(&mut record, fourth, 2_000, LIMITS),
        Err(TransitionError::TooManySessions(3))
    );
    assert_eq!(record, before);
    open(&mut record, "d0", 10, Activity::Idle, 2_000);
    assert_eq!(record.sessions.len(), 3);
}

#[test]
fn touch_opens_then_renews_and_moves_the_session_to_the_touching_node() {
    let mut record = UserRecord::default();
    let touch = |conn_id: u64, node: &str, activity| Mutation::Touch {
        session: Session {
            node_id: node.to_owned(),
            ..session("browser", conn_id, Activity::Active)
        },
        activity,
    };
    apply(&mut record, touch(1, "n1", None), 1_000, LIMITS).unwrap();
    assert_eq!(record.shown.status, VisibleStatus::Online);
    apply(
        &mut record,
        touch(2, "n2", Some(Activity::Idle)),
        2_000,
        LIMITS,
    )
    .unwrap();
    assert_eq!(record.sessions.len(), 1);
    assert_eq!(record.sessions[0].node_id, "n2");
    assert_eq!(record.shown.status, VisibleStatus::Idle);
}

#[test]
fn going_invisible_looks_like_a_logout_and_then_nothing_moves() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    set_status(&mut record, ChosenStatus::Invisible, "secret", 2_000);
    let hidden = record.shown.clone();
    assert_eq!(hidden.status, VisibleStatus::Offline);
    assert_eq!(hidden.offline_reason, Some(OfflineReason::Invisible));
    assert_eq!(hidden.custom_message, "");
    assert_eq!(hidden.last_seen_ms, 2_000);

    // Devices come and go, activity changes, the message changes: contacts
    // see none of it, not even a version.
    open(&mut record, "laptop", 2, Activity::Idle, 3_000);
    set_status(&mut record, ChosenStatus::Invisible, "other secret", 4_000);
    end(&mut record, "phone", Some(1), OfflineReason::Logout, 5_000);
    end(
        &mut record,
        "laptop",
        Some(2),
        OfflineReason::LeaseExpired,
        6_000,
    );
    assert_eq!(record.shown, hidden);

    let contact = View::of("u", Some(&record), Viewer::Contact);
    assert_eq!(contact.offline_reason, Some(OfflineReason::Logout));
    assert_eq!(contact.chosen, None);
    assert!(contact.devices.is_empty());
    let owner = View::of("u", Some(&record), Viewer::Owner);
    assert_eq!(owner.offline_reason, Some(OfflineReason::Invisible));
    assert_eq!(owner.chosen, Some(ChosenStatus::Invisible));
}

#[test]
fn coming_back_from_invisible_is_a_new_visible_change() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    set_status(&mut record, ChosenStatus::Invisible, "", 2_000);
    let hidden_version = record.shown.version;
    set_status(&mut record, ChosenStatus::Online, "back", 3_000);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    assert_eq!(record.shown.custom_message, "back");
    assert!(record.shown.version > hidden_version);
}

#[test]
fn a_user_invisible_from_the_start_is_never_seen() {
    let mut record = UserRecord::default();
    let mutation = Mutation::Open {
        session: session("phone", 1, Activity::Active),
        status: Some((ChosenStatus::Invisible, String::new())),
    };
    let applied = apply(&mut record, mutation, 1_000, LIMITS).unwrap();
    assert!(!applied.shown_changed);
    assert_eq!(record.shown, Shown::default());
    assert_eq!(
        View::of("u", Some(&record), Viewer::Contact),
        View::of("u", None, Viewer::Contact)
    );
}

#[test]
fn strangers_learn_nothing() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    set_status(&mut record, ChosenStatus::Busy, "hi", 2_000);
    let stranger = View::of("u", Some(&record), Viewer::Stranger);
    assert_eq!(stranger, View::of("u", None, Viewer::Stranger));
    assert_eq!(stranger.version, 0);
    assert_eq!(stranger.last_seen_ms, 0);
}

#[test]
fn admins_and_owners_see_devices_and_the_chosen_status() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    for viewer in [Viewer::Owner, Viewer::Admin] {
        let view = View::of("u", Some(&record), viewer);
        assert_eq!(view.devices.len(), 1);
        assert_eq!(view.chosen, Some(ChosenStatus::Online));
    }
}

#[test]
fn history_hides_invisibility_from_contacts_only() {
    let entry = HistoryRecord {
        user_id: "u".into(),
        at_ms: 1,
        status: VisibleStatus::Offline,
        custom_message: String::new(),
        offline_reason: Some(OfflineReason::Invisible),
        version: 1,
    };
    assert_eq!(
        history_view(entry.clone(), Viewer::Contact).offline_reason,
        Some(OfflineReason::Logout)
    );
    assert_eq!(
        history_view(entry.clone(), Viewer::Owner).offline_reason,
        Some(OfflineReason::Invisible)
    );
    assert_eq!(
        history_view(entry, Viewer::Admin).offline_reason,
        Some(OfflineReason::Invisible)
    );
}

#[test]
fn ending_an_unknown_session_changes_nothing() {
    let mut record = UserRecord::default();
    let applied = end(&mut record, "ghost", None, OfflineReason::Logout, 1_000);
    assert_eq!(applied, Applied::default());
    assert!(record.is_empty());
}

#[test]
fn a_replay_applies_its_changes_in_order_as_one_and_skips_what_no_longer_applies() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    let before = record.shown.version;
    let replay = Mutation::Replay(vec![
        (
            1_500,
            Mutation::SetStatus {
                chosen: ChosenStatus::Busy,
                custom_message: "first".into(),
            },
        ),
        // Taken over by another connection meanwhile: refused, skipped.
        (
            1_600,
            Mutation::Update {
                session: session("phone", 2, Activity::Idle),
                activity: Some(Activity::Idle),
                status: None,
            },
        ),
        (
            1_700,
            Mutation::SetStatus {
                chosen: ChosenStatus::Busy,
                custom_message: "last".into(),
            },
        ),
    ]);
    let (applied, steps) = apply_stepwise(&mut record, replay, 2_000, LIMITS).unwrap();
    assert!(applied.record_changed && applied.shown_changed);
    assert_eq!(record.shown.status, VisibleStatus::Busy);
    assert_eq!(record.shown.custom_message, "last");
    // The step before the last, for the change log.
    let shown: Vec<(&str, u64)> = steps
        .iter()
        .map(|step| (step.shown.custom_message.as_str(), step.shown.version))
        .collect();
    assert_eq!(shown, [("first", 1_500_000)]);
    assert_eq!(record.sessions[0].activity, Activity::Active);
    assert!(record.shown.version > before);
    // As shown when the last change was taken, not when it was replayed.
    assert_eq!(record.shown.last_seen_ms, 1_700);
    assert_eq!(record.shown.version, 1_700_000);

    let repeat = Mutation::Replay(vec![(
        2_500,
        Mutation::SetStatus {
            chosen: ChosenStatus::Busy,
            custom_message: "last".into(),
        },
    )]);
    let applied = apply(&mut record, repeat, 3_000, LIMITS).unwrap();
    assert!(!applied.record_changed && !applied.shown_changed);
}

#[test]
fn what_a_node_showed_during_an_outage_is_never_read_older() {
    let mut record = UserRecord::default();
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    let seen = Shown {
        version: record.shown.version + 5,
        last_seen_ms: 1_005,
        ..record.shown.clone()
    };
    let applied = apply(
        &mut record,
        Mutation::NotOlderThan(seen.clone()),
        2_000,
        LIMITS,
    )
    .unwrap();
    assert!(applied.shown_changed);
    assert_eq!(record.shown, seen, "the same state takes the version seen");

    let offline = Shown {
        status: VisibleStatus::Offline,
        version: record.shown.version + 5,
        offline_reason: Some(OfflineReason::Logout),
        ..record.shown.clone()
    };
    apply(
        &mut record,
        Mutation::NotOlderThan(offline.clone()),
        3_000,
        LIMITS,
    )
    .unwrap();
    assert_eq!(record.shown.status, VisibleStatus::Online);
    assert!(
        record.shown.version > offline.version,
        "another state, a newer version"
    );

    let older = Shown {
        version: 1,
        ..offline
    };
    let applied = apply(&mut record, Mutation::NotOlderThan(older), 4_000, LIMITS).unwrap();
    assert_eq!(applied, Applied::default());
}

#[test]
fn a_change_if_known_is_refused_on_a_record_the_store_forgot() {
    let mut record = UserRecord::default();
    let set = Mutation::SetStatus {
        chosen: ChosenStatus::Busy,
        custom_message: String::new(),
    };
    let refused = apply(
        &mut record,
        Mutation::IfKnown(Box::new(set.clone())),
        1_000,
        LIMITS,
    );
    assert_eq!(refused, Err(TransitionError::Forgotten));
    assert!(record.is_empty());
    open(&mut record, "phone", 1, Activity::Active, 1_000);
    apply(&mut record, Mutation::IfKnown(Box::new(set)), 2_000, LIMITS).unwrap();
    assert_eq!(record.shown.status, VisibleStatus::Busy);
}
