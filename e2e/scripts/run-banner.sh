#!/usr/bin/env bash
# Printed by `make run` before the server starts: how to get a development
# token and watch presence move from a second and third terminal.
cat <<'TEXT'

  Presence is starting on 127.0.0.1:50051 (embedded backends, development mode).

  In another terminal, mint development tokens and make alice and bob contacts:

    export PATH=$PWD/target/release:$PATH
    ADMIN=$(presence-server token --dev --user ops --admin)
    ALICE=$(presence-server token --dev --user alice)
    BOB=$(presence-server token --dev --user bob)
    presence --token $ADMIN contacts add alice bob

  Watch alice's contacts:      presence --token $ALICE watch
  In a third, bring bob online: presence --token $BOB online --device laptop
  then try --status busy, --idle, or Ctrl-C (bob goes offline).

  Every change also lands in the change feed (admin token):
    presence --token $ADMIN feed tail --since 10m
    presence --token $ADMIN feed consume --group demo --from oldest

  gRPC reflection is on, so grpcurl works too:
    grpcurl -plaintext -H "authorization: Bearer $ALICE" -d '{"user_ids":["bob"]}' \
      127.0.0.1:50051 presence.v1.PresenceService/GetPresence

TEXT
