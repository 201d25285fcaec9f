package state

import (
	"fmt"
	"hash/fnv"
	"strconv"

	"github.com/vaultfleet/vaultfleet/tasks"
)

// Key layout. Every key of one connection and the indexes of its shard
// carry the hash tag {sNN}, so that one Lua script can update a record and
// all of its index entries atomically, also on Redis Cluster:
//
//	<prefix>:{sNN}:conn:<consumer>|<connection>   hash: the record
//	<prefix>:{sNN}:st:<state>                       lex zset per state
//	<prefix>:{sNN}:svc:<service_id>                 lex zset per integration
//	<prefix>:{sNN}:due:check                        zset scored by unix ms
//	<prefix>:{sNN}:due:refresh                      zset scored by unix ms
//	<prefix>:{sNN}:counts                           hash "<service_id>|<state>" -> n
//
// The member of every index is Ref.String(), "<consumer>|<connection>";
// consumer ids never contain '|', so one consumer's connections are the
// contiguous lex range ["<consumer>|", "<consumer>}") of each index.
//
// There is no index of all connections: every connection is in exactly
// one service index, and the services of a shard are the fields of its
// counts hash, so "all" is the union of those service indexes (List,
// ListConsumer, ResealAll and DeleteConsumer walk them). Releases before
// this layout kept a lex zset <prefix>:{sNN}:all of every member (about
// 120 bytes per connection); nothing reads or writes it now, so in a store
// written by them it is a harmless leftover that only holds memory. Once
// no process of an older release runs against the store, remove it with
// UNLINK <prefix>:{sNN}:all for each shard (an older release would not
// list connections written without it).
//
// Record fields: v (version), st (state), svc (service id), d (the
// non-secret facts, packed: see store_codec_bin.go; JSON in records written
// before, still read) and c (the credentials, compact JSON sealed with the
// keyring, the record key as additional data).
const (
	fieldVersion = "v"
	fieldState   = "st"
	fieldService = "svc"
	fieldData    = "d"
	fieldCreds   = "c"
)

// keys names the keys of one shard.
type keys struct {
	tag string // "vf:{s07}:"
}

// shardOf returns the shard of a consumer: fnv-32a(consumerID) % shards.
func shardOf(consumerID string, shards int) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(consumerID))
	return int(h.Sum32() % uint32(shards))
}

// shardKeys returns the key names of shard n.
func (s *Store) shardKeys(n int) keys { return keys{tag: s.tags[n]} }

// shardTags makes the key prefix of every shard.
func shardTags(prefix string, shards int) []string {
	width := shardWidthFor(shards)
	tags := make([]string, shards)
	for n := range tags {
		tags[n] = prefix + ":{s" + fmt.Sprintf("%0*d", width, n) + "}:"
	}
	return tags
}

func (k keys) record(member string) string { return k.tag + "conn:" + member }
func (k keys) state(st State) string       { return k.tag + "st:" + string(st) }
func (k keys) service(id string) string    { return k.tag + "svc:" + id }
func (k keys) counts() string              { return k.tag + "counts" }
func (k keys) due(idx Index) string        { return k.tag + "due:" + string(idx) }

// keysOf returns the shard keys of a connection.
func (s *Store) keysOf(ref Ref) keys { return s.shardKeys(shardOf(ref.ConsumerID, s.cfg.Shards)) }

// ShardOf returns the index shard that holds the consumer's connections.
func (s *Store) ShardOf(consumerID string) int { return shardOf(consumerID, s.cfg.Shards) }

// shardWidthFor is the number of digits of the shard number in keys: two,
// or more when there are more than 100 shards.
func shardWidthFor(shards int) int {
	return max(2, len(strconv.Itoa(shards-1)))
}

// validateRef checks the ids of a reference; the error names the field,
// never echoes the value.
func validateRef(ref Ref) error {
	if !tasks.ValidConsumerID(ref.ConsumerID) {
		return &FieldError{Field: "consumer_id", Msg: "must be 1 to 128 letters, digits or . _ : @ -, starting with a letter or digit"}
	}
	if !tasks.ValidConnectionID(ref.ConnectionID) {
		return &FieldError{Field: "connection_id", Msg: `must be "{unified_api}+{service_id}" in lower case`}
	}
	return nil
}
