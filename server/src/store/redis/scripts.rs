//! The Lua scripts, each kept as a `.lua` file with its KEYS/ARGV contract in
//! a header comment. [`redis::Script`] calls them by SHA (`EVALSHA`) and loads
//! them again where a node answers NOSCRIPT, e.g. a replica just promoted.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub(super) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(include_str!(concat!("scripts/", $file))));
    };
}

script!(CAS_RECORD, "cas_record.lua");
script!(RENEW_NODE, "renew_node.lua");
script!(LOST_NODES, "lost_nodes.lua");
script!(FORGET_NODE, "forget_node.lua");
script!(CONTACTS_ADD, "contacts_add.lua");
script!(CONTACTS_LINK, "contacts_link.lua");
script!(HISTORY_APPEND, "history_append.lua");
script!(CHOICE_SAVE, "choice_save.lua");
script!(FEED_JOIN, "feed_join.lua");
