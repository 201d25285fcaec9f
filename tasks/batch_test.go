package tasks

import (
	"errors"
	"strings"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

func TestValidateBatchTask(t *testing.T) {
	t.Parallel()
	members := []BatchMember{
		{ConsumerID: "c1", ConnectionID: "crm+hubspot", Due: 1700000000},
		{ConsumerID: "c2", ConnectionID: "crm+hubspot", Due: 1700000060},
	}
	task, err := NewValidateBatchTask("hubspot", members)
	if err != nil {
		t.Fatal(err)
	}
	if task.Type() != TypeValidateBatch {
		t.Fatalf("type %q", task.Type())
	}
	p, err := ParseBatchPayload(task.Payload())
	if err != nil {
		t.Fatal(err)
	}
	got := p.Members()
	if len(got) != 2 || got[1] != members[1] || got[0] != members[0] {
		t.Fatalf("members %+v", got)
	}
	again, err := NewValidateBatchTask("hubspot", members)
	if err != nil {
		t.Fatal(err)
	}
	other, err := NewValidateBatchTask("hubspot", members[:1])
	if err != nil {
		t.Fatal(err)
	}
	// Enqueued for real: the id dedupes the same claims, the queue is low.
	rdb := redistest.Start(t).Client(t)
	client := asynq.NewClientFromRedisClient(rdb)
	t.Cleanup(func() { _ = client.Close() })
	info, err := client.Enqueue(task)
	require.NoError(t, err)
	require.Equal(t, QueueLow, info.Queue)
	require.Equal(t, RetentionScheduled, info.Retention)
	require.Contains(t, info.ID, "hubspot")
	_, err = client.Enqueue(again)
	require.ErrorIs(t, err, asynq.ErrTaskIDConflict, "the same members and due times are one task")
	_, err = client.Enqueue(other)
	require.NoError(t, err, "other members are another task")
	if strings.Contains(string(task.Payload()), "token") {
		t.Fatal("payload carries ids only")
	}
}

func TestValidateBatchRejects(t *testing.T) {
	t.Parallel()
	ok := BatchMember{ConsumerID: "c1", ConnectionID: "crm+hubspot", Due: 1}
	many := make([]BatchMember, MaxBatch+1)
	for i := range many {
		many[i] = BatchMember{ConsumerID: "c" + strings.Repeat("x", i%50) + string(rune('a'+i%26)), ConnectionID: "crm+hubspot", Due: 1}
	}
	for name, tc := range map[string]struct {
		svc     string
		members []BatchMember
	}{
		"empty":         {"hubspot", nil},
		"too many":      {"hubspot", many},
		"other service": {"hubspot", []BatchMember{ok, {ConsumerID: "c2", ConnectionID: "crm+salesforce", Due: 1}}},
		"twice":         {"hubspot", []BatchMember{ok, ok}},
		"bad consumer":  {"hubspot", []BatchMember{{ConsumerID: "c 1", ConnectionID: "crm+hubspot", Due: 1}}},
		"no due":        {"hubspot", []BatchMember{{ConsumerID: "c1", ConnectionID: "crm+hubspot"}}},
		"bad service":   {"Hub Spot", []BatchMember{ok}},
	} {
		if _, err := NewValidateBatchTask(tc.svc, tc.members); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
	for name, raw := range map[string]string{
		"not json":     `{`,
		"version":      `{"v":2,"service_id":"hubspot","reason":"scheduled","refs":["c1|crm+hubspot"],"due":[1]}`,
		"reason":       `{"v":1,"service_id":"hubspot","reason":"on_demand","refs":["c1|crm+hubspot"],"due":[1]}`,
		"due mismatch": `{"v":1,"service_id":"hubspot","reason":"scheduled","refs":["c1|crm+hubspot"],"due":[]}`,
		"no bar":       `{"v":1,"service_id":"hubspot","reason":"scheduled","refs":["c1crm+hubspot"],"due":[1]}`,
	} {
		_, err := ParseBatchPayload([]byte(raw))
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
		if strings.Contains(err.Error(), "c1") {
			t.Errorf("%s: error echoes the input: %v", name, err)
		}
	}
}
