package tasks

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hibiken/asynq"
)

// TypeValidateBatch is a batch of periodic checks of one integration's
// connections: the scheduler's way of checking what is due without paying
// asynq's cost per task for every check (most periodic checks change
// nothing). The worker checks each member and applies each verdict on its
// own, with its own compare-and-set, exactly as a connection:validate
// would. Work somebody waits for (on demand, a credentials change, a
// confirmation, a refresh) keeps its own connection task.
const TypeValidateBatch = "connection:validate_batch"

// MaxBatch is the most members one batch carries.
const MaxBatch = 500

// Batch timeouts: a batch checks its members one after another, so it may
// run much longer than one check.
const (
	ValidateBatchTimeout  = 10 * time.Minute
	ValidateBatchMaxRetry = ValidateMaxRetry
)

// BatchMember is one connection of a batch and the due time (unix
// seconds) the scheduler claimed it at.
type BatchMember struct {
	ConsumerID   string
	ConnectionID string
	Due          int64
}

// BatchPayload is the payload of connection:validate_batch: ids and due
// times, never a secret. Members are "consumer|connection" strings with
// their due times in a parallel list, to keep a batch of hundreds small.
type BatchPayload struct {
	V int `json:"v"`
	// ServiceID is the integration every member belongs to.
	ServiceID string   `json:"service_id"`
	Reason    Reason   `json:"reason"`
	Refs      []string `json:"refs"`
	Due       []int64  `json:"due"`
}

// Members returns the batch's members (the payload must have been
// checked: ParseBatchPayload).
func (p BatchPayload) Members() []BatchMember {
	out := make([]BatchMember, len(p.Refs))
	for i, r := range p.Refs {
		c, conn, _ := strings.Cut(r, "|")
		out[i] = BatchMember{ConsumerID: c, ConnectionID: conn, Due: p.Due[i]}
	}
	return out
}

func (p BatchPayload) validate() error {
	switch {
	case p.V != PayloadVersion:
		return fmt.Errorf("%w: unsupported payload version %d (want %d)", ErrMalformed, p.V, PayloadVersion)
	case !slugRE.MatchString(p.ServiceID):
		return fmt.Errorf("%w: service_id missing or not a valid id", ErrMalformed)
	case p.Reason != ReasonScheduled:
		return fmt.Errorf("%w: a batch is for scheduled checks only", ErrMalformed)
	case len(p.Refs) == 0 || len(p.Refs) > MaxBatch:
		return fmt.Errorf("%w: a batch has 1 to %d members, not %d", ErrMalformed, MaxBatch, len(p.Refs))
	case len(p.Due) != len(p.Refs):
		return fmt.Errorf("%w: %d due times for %d members", ErrMalformed, len(p.Due), len(p.Refs))
	}
	seen := make(map[string]bool, len(p.Refs))
	for i, r := range p.Refs {
		c, conn, ok := strings.Cut(r, "|")
		switch {
		case !ok || !consumerRE.MatchString(c) || !connectionRE.MatchString(conn):
			return fmt.Errorf("%w: member %d is not consumer_id|connection_id", ErrMalformed, i)
		case !strings.HasSuffix(conn, "+"+p.ServiceID):
			return fmt.Errorf("%w: member %d is not a connection of %s", ErrMalformed, i, p.ServiceID)
		case seen[r]:
			return fmt.Errorf("%w: member %d appears twice", ErrMalformed, i)
		case p.Due[i] <= 0:
			return fmt.Errorf("%w: member %d has no due time", ErrMalformed, i)
		}
		seen[r] = true
	}
	return nil
}

// NewValidateBatchTask returns a connection:validate_batch task of
// periodic checks (reason scheduled, the low queue) of one integration's
// connections. Its task id is a digest of the members and their due
// times: the same claims enqueued twice (a retried enqueue) make one task.
func NewValidateBatchTask(serviceID string, members []BatchMember) (*asynq.Task, error) {
	p := BatchPayload{V: PayloadVersion, ServiceID: serviceID, Reason: ReasonScheduled,
		Refs: make([]string, len(members)), Due: make([]int64, len(members))}
	h := sha256.New()
	for i, m := range members {
		p.Refs[i], p.Due[i] = m.ConsumerID+"|"+m.ConnectionID, m.Due
		h.Write([]byte(p.Refs[i]))
		h.Write([]byte{' '})
		h.Write(strconv.AppendInt(nil, m.Due, 10))
		h.Write([]byte{'\n'})
	}
	if err := p.validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	id := TypeValidateBatch + ":" + serviceID + ":" + hex.EncodeToString(h.Sum(nil)[:12])
	return asynq.NewTask(TypeValidateBatch, b, asynq.Queue(QueueLow), asynq.TaskID(id),
		asynq.Timeout(ValidateBatchTimeout), asynq.MaxRetry(ValidateBatchMaxRetry),
		asynq.Retention(RetentionScheduled)), nil
}

// ParseBatchPayload decodes and checks a connection:validate_batch
// payload. Errors wrap ErrMalformed and never echo the input.
func ParseBatchPayload(b []byte) (BatchPayload, error) {
	var p BatchPayload
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%w: %s", ErrMalformed, jsonErr(err))
	}
	return p, p.validate()
}
