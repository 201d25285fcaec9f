package worker

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// batchKey is the API key of batch member i; the provider answers by key.
func batchKey(i int) string { return fmt.Sprintf("k%d_SECRET_batch", i) }

func batchConsumer(i int) string { return fmt.Sprintf("bc-%d", i) }

// keyedProvider answers /acme/me by the API key: answer(i, attempt)
// gives the status (and Retry-After seconds) of member i's attempt-th
// check (from 1). It counts checks per member.
type keyedProvider struct {
	mu     sync.Mutex
	calls  map[int]int
	answer func(i, attempt int) (status, retryAfter int)
}

func (k *keyedProvider) handler(rw http.ResponseWriter, r *http.Request) {
	var i int
	if _, err := fmt.Sscanf(strings.TrimPrefix(r.Header.Get("X-Api-Token"), "Token "), "k%d_SECRET_batch", &i); err != nil {
		rw.WriteHeader(http.StatusUnauthorized)
		return
	}
	k.mu.Lock()
	k.calls[i]++
	n := k.calls[i]
	k.mu.Unlock()
	code, after := k.answer(i, n)
	if after > 0 {
		rw.Header().Set("Retry-After", fmt.Sprint(after))
	}
	rw.WriteHeader(code)
}

func (k *keyedProvider) count(i int) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.calls[i]
}

// putBatchMembers stores n acme connections, member i with batchKey(i).
func (b *bundle) putBatchMembers(n int) {
	b.t.Helper()
	for i := range n {
		_, err := b.store.Put(context.Background(), state.Ref{ConsumerID: batchConsumer(i), ConnectionID: "crm+acme"},
			state.Input{Credentials: map[string]string{"api_key": batchKey(i)}}, 0)
		require.NoError(b.t, err)
	}
}

func batchMembers(n int, due time.Time) []tasks.BatchMember {
	out := make([]tasks.BatchMember, n)
	for i := range out {
		out[i] = tasks.BatchMember{ConsumerID: batchConsumer(i), ConnectionID: "crm+acme", Due: due.Unix()}
	}
	return out
}

// TestBatchChecksEachMemberOnItsOwn runs a batch of periodic checks of one
// integration through a real asynq server: each member gets the verdict a
// connection:validate would give it (valid, invalid), a member the
// provider throttles makes the batch retry after its Retry-After, and the
// retry checks that member only. A second batch (the next due time) finds
// nothing new: the unchanged verdicts take the store's lean write.
func TestBatchChecksEachMemberOnItsOwn(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	const n = 6
	kp := &keyedProvider{calls: map[int]int{}, answer: func(i, attempt int) (int, int) {
		switch {
		case i == 3:
			return http.StatusUnauthorized, 0
		case i == 4 && attempt == 1:
			return http.StatusTooManyRequests, 1
		}
		return http.StatusOK, 0
	}}
	b.p.handle("/acme/me", kp.handler)
	ctx := context.Background()
	b.putBatchMembers(n)
	w := b.worker()
	b.start(w)

	task, err := tasks.NewValidateBatchTask("acme", batchMembers(n, time.Now().Add(-time.Minute)))
	require.NoError(t, err)
	ti := b.awaitTask(b.enqueue(task), asynq.TaskStateCompleted, 20*time.Second)
	require.Equal(t, 1, ti.Retried, "retried once, for the throttled member")
	res := decodeResult(t, ti.Result)
	require.Equal(t, outcomeChecked, res.Outcome)
	require.Equal(t, n, res.Batch.Members)
	require.Equal(t, map[string]int{outcomeValid: 1, outcomeAlreadyChecked: n - 1}, res.Batch.Outcomes,
		"the retry checked the throttled member only")

	for i := range n {
		c, err := b.store.Get(ctx, state.Ref{ConsumerID: batchConsumer(i), ConnectionID: "crm+acme"})
		require.NoError(t, err)
		want, calls := state.Callable, 1
		switch i {
		case 3:
			want = state.Invalid
		case 4:
			calls = 2
		}
		require.Equal(t, want, c.State, "member %d", i)
		require.Equal(t, calls, kp.count(i), "checks of member %d", i)
	}

	// The next due time: nothing changes; the verdicts take touch.lua.
	watch := redistest.WatchScripts(t, b.rdb.Options().Addr)
	task, err = tasks.NewValidateBatchTask("acme", batchMembers(n, time.Now().Add(time.Second)))
	require.NoError(t, err)
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(1100 * time.Millisecond))) // checks come after the due second
	ti = b.awaitTask(b.enqueue(task), asynq.TaskStateCompleted, 20*time.Second)
	res = decodeResult(t, ti.Result)
	require.Equal(t, map[string]int{outcomeValid: n - 1, outcomeInvalid: 1}, res.Batch.Outcomes)
	require.Empty(t, res.Batch.Changed)
	rep := watch.Report(t)
	require.GreaterOrEqual(t, rep.Runs[redistest.SHA1(touchLuaForTest(t))], n-1, "unchanged verdicts take the lean write")

	requireNoSecrets(t, b.logs.String())
	requireNoSecrets(t, string(ti.Result))
}

// TestBatchMalformedArchivedAtOnce: a batch payload that cannot be read is
// archived without a retry, and says why.
func TestBatchMalformedArchivedAtOnce(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	b.start(b.worker())
	info := b.enqueue(asynq.NewTask(tasks.TypeValidateBatch,
		[]byte(`{"v":1,"service_id":"acme","reason":"scheduled","refs":["bc-1|crm+acme"],"due":[]}`),
		asynq.Queue(tasks.QueueLow), asynq.MaxRetry(12)))
	ti := b.awaitTask(info, asynq.TaskStateArchived, 10*time.Second)
	require.Zero(t, ti.Retried)
	require.Contains(t, ti.LastErr, "malformed payload")
	require.Equal(t, "malformed", decodeResult(t, ti.Result).Outcome)
}

// TestBatchStopsWhenTheBreakerOpens: a 5xx storm opens the integration's
// breaker in the middle of a batch; the batch stops there (the rest would
// be held back too) and nothing turns invalid.
func TestBatchStopsWhenTheBreakerOpens(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	const n = 12
	kp := &keyedProvider{calls: map[int]int{}, answer: func(int, int) (int, int) { return http.StatusServiceUnavailable, 0 }}
	b.p.handle("/acme/me", kp.handler)
	ctx := context.Background()
	b.putBatchMembers(n)
	w := b.worker(func(c *Config) { c.BreakerMinRequests = 3 })
	task, err := tasks.NewValidateBatchTask("acme", batchMembers(n, time.Now().Add(-time.Minute)))
	require.NoError(t, err)
	err = process(t, w, task)
	require.ErrorIs(t, err, ErrCircuitOpen)
	total := 0
	for i := range n {
		total += kp.count(i)
		c, err := b.store.Get(ctx, state.Ref{ConsumerID: batchConsumer(i), ConnectionID: "crm+acme"})
		require.NoError(t, err)
		require.NotEqual(t, state.Invalid, c.State)
	}
	require.Less(t, total, n, "the batch stopped once the breaker opened")
}

// touchLuaForTest is the store's lean write script, as Redis hashes it.
func touchLuaForTest(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "state", "lua", "touch.lua"))
	require.NoError(t, err)
	return string(b)
}

// TestBatchAcrossReadsSkipsUnreadableMember: a batch of more members than
// one read (readChunk) and than one write of held verdicts (maxDeferred)
// checks each member exactly once; a member whose credentials were sealed
// with a key the worker does not hold is skipped, as connection:validate
// skips it, and does not make the batch retry.
func TestBatchAcrossReadsSkipsUnreadableMember(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	const n, unreadable = 3*readChunk + 5, 2*readChunk + 3
	require.Greater(t, n, 2*maxDeferred)
	kp := &keyedProvider{calls: map[int]int{}, answer: func(int, int) (int, int) { return http.StatusOK, 0 }}
	b.p.handle("/acme/me", kp.handler)
	b.putBatchMembers(n)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k9"))
	require.NoError(t, err)
	other, err := state.New(state.Config{Client: b.rdb, Catalog: b.cat, Keys: keys})
	require.NoError(t, err)
	_, err = other.Put(context.Background(), state.Ref{ConsumerID: batchConsumer(unreadable), ConnectionID: "crm+acme"},
		state.Input{Credentials: map[string]string{"api_key": batchKey(unreadable)}}, 0)
	require.NoError(t, err) // sealed under k9, which the worker's store does not hold
	w := b.worker()
	task, err := tasks.NewValidateBatchTask("acme", batchMembers(n, time.Now().Add(-time.Minute)))
	require.NoError(t, err)

	require.NoError(t, process(t, w, task), "an unreadable member does not fail the batch")
	for i := range n {
		want := 1
		if i == unreadable {
			want = 0
		}
		require.Equal(t, want, kp.count(i), "checks of member %d", i)
		if i != unreadable {
			c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: batchConsumer(i), ConnectionID: "crm+acme"})
			require.NoError(t, err)
			require.Equal(t, state.Callable, c.State, "member %d", i)
		}
	}
	require.Contains(t, b.logs.String(), `"skipped":"`+skipUnreadable+`"`)
	requireNoSecrets(t, b.logs.String())
}
