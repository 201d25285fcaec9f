package api

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"time"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Page sizes of GET /vault/consumers (Apideck's bounds).
const (
	vaultConsumersDefaultLimit = 20
	vaultConsumersMaxLimit     = 200
)

// vaultConsumer is Apideck's Consumer.
type vaultConsumer struct {
	ConsumerID    string               `json:"consumer_id"`
	ApplicationID string               `json:"application_id"`
	Metadata      json.RawMessage      `json:"metadata,omitempty"`
	Connections   []consumerConnection `json:"connections,omitempty"`
	Services      []string             `json:"services,omitempty"`
	Created       string               `json:"created,omitempty"`
	Modified      string               `json:"modified,omitempty"`
}

// consumerConnection is Apideck's ConsumerConnection (whose times are
// strings, unlike Connection's).
type consumerConnection struct {
	ID         string          `json:"id"`
	Name       string          `json:"name"`
	ServiceID  string          `json:"service_id"`
	UnifiedAPI string          `json:"unified_api"`
	ConsumerID string          `json:"consumer_id"`
	AuthType   string          `json:"auth_type"`
	Enabled    bool            `json:"enabled"`
	Settings   map[string]any  `json:"settings"`
	Metadata   json.RawMessage `json:"metadata"`
	CreatedAt  string          `json:"created_at"`
	UpdatedAt  *string         `json:"updated_at"`
	State      state.State     `json:"state"`
	Health     string          `json:"health"`
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func (s *server) consumerView(r *http.Request, c *state.Consumer) vaultConsumer {
	v := vaultConsumer{ConsumerID: c.ID, ApplicationID: r.Header.Get(headerAppID),
		Created: rfc3339(c.CreatedAt), Modified: rfc3339(c.ModifiedAt)}
	if len(c.Metadata) > 0 {
		v.Metadata = c.Metadata
	}
	return v
}

// withConnections adds the consumer's connections and services.
func (s *server) withConnections(v *vaultConsumer, conns []*state.Connection) {
	now := s.cfg.NowFunc()
	for _, c := range conns {
		in, _ := s.lookup(c.UnifiedAPI, c.ServiceID)
		cv := s.vaultViewLinks(vaultView(c, in, now), c)
		upd := rfc3339(c.UpdatedAt)
		v.Connections = append(v.Connections, consumerConnection{
			ID: cv.ID, Name: cv.Name, ServiceID: cv.ServiceID, UnifiedAPI: cv.UnifiedAPI, ConsumerID: c.ConsumerID,
			AuthType: cv.AuthType, Enabled: cv.Enabled, Settings: cv.Settings, Metadata: cv.Metadata,
			CreatedAt: rfc3339(c.CreatedAt), UpdatedAt: &upd, State: cv.State, Health: cv.Health,
		})
		v.Services = append(v.Services, c.ServiceID)
	}
	sort.Strings(v.Services)
}

// vaultConsumerBody is Apideck's CreateConsumerRequest/UpdateConsumerRequest.
type vaultConsumerBody struct {
	ConsumerID *string         `json:"consumer_id"`
	Metadata   json.RawMessage `json:"metadata"`
}

// checkConsumerMetadata accepts Apideck's ConsumerMetadata: an object of
// strings (account_name, user_name, email, image, ...), or null.
func checkConsumerMetadata(raw json.RawMessage) error {
	if raw == nil || string(raw) == "null" {
		return nil
	}
	var m map[string]string
	if err := json.Unmarshal(raw, &m); err != nil {
		return errf(http.StatusBadRequest, codeInvalidField, "metadata: want an object of strings (account_name, user_name, email, image)")
	}
	return nil
}

func (s *server) vaultCreateConsumer(w http.ResponseWriter, r *http.Request) {
	var body vaultConsumerBody
	if err := s.decodeLenient(w, r, &body); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	if body.ConsumerID == nil || !tasks.ValidConsumerID(*body.ConsumerID) {
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField,
			"consumer_id: required, 1 to 128 letters, digits or . _ : @ -, starting with a letter or digit"))
		return
	}
	if err := checkConsumerMetadata(body.Metadata); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	c, err := s.vault.CreateConsumer(r.Context(), *body.ConsumerID, body.Metadata)
	if errors.Is(err, state.ErrConsumerExists) {
		err = errf(http.StatusConflict, "consumer_exists", "a consumer with this consumer_id exists")
	}
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	writeVault(w, http.StatusOK, s.consumerView(r, c))
}

func (s *server) vaultListConsumers(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := vaultConsumersDefaultLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > vaultConsumersMaxLimit {
			s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidQuery,
				"limit must be an integer from 1 to "+strconv.Itoa(vaultConsumersMaxLimit)))
			return
		}
		limit = n
	}
	prefix := q.Get("filter[consumer_id]")
	if prefix != "" && !tasks.ValidConsumerID(prefix) {
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidQuery, "filter[consumer_id] is not a consumer id prefix"))
		return
	}
	cursor := q.Get("cursor")
	list, next, err := s.vault.ListConsumers(r.Context(), prefix, cursor, limit)
	if err != nil {
		var fe *state.FieldError
		if errors.As(err, &fe) {
			err = errf(http.StatusBadRequest, codeInvalidQuery, fe.Field+": "+fe.Msg)
		}
		s.vaultFail(w, r, err)
		return
	}
	data := make([]vaultConsumer, 0, len(list))
	for _, c := range list {
		data = append(data, s.consumerView(r, c))
	}
	meta := &vaultMeta{ItemsOnPage: len(data)}
	links := &vaultLinks{Current: consumersURL(q, cursor)}
	if cursor != "" {
		meta.Cursors.Current = &cursor
	}
	if next != "" {
		meta.Cursors.Next = &next
		u := consumersURL(q, next)
		links.Next = &u
	}
	writeJSON(w, http.StatusOK, vaultOK{StatusCode: http.StatusOK, Status: "OK", Data: data, Meta: meta, Links: links})
}

func consumersURL(q url.Values, cursor string) string {
	q2 := url.Values{}
	for k, v := range q {
		q2[k] = v
	}
	q2.Del("cursor")
	if cursor != "" {
		q2.Set("cursor", cursor)
	}
	if len(q2) == 0 {
		return pathVaultConsumers
	}
	return pathVaultConsumers + "?" + q2.Encode()
}

// consumerFromPath reads {consumer_id}.
func consumerFromPath(r *http.Request) (string, error) {
	id := r.PathValue("consumer_id")
	if !tasks.ValidConsumerID(id) {
		return "", errf(http.StatusBadRequest, codeInvalidID,
			"consumer_id must be 1 to 128 letters, digits or . _ : @ -, starting with a letter or digit")
	}
	return id, nil
}

var errNoConsumer = errf(http.StatusNotFound, codeNotFound, "no consumer with this consumer_id")

// vaultGetConsumer answers for a consumer that has a record or at least
// one connection (connections written through /v1 have no record).
func (s *server) vaultGetConsumer(w http.ResponseWriter, r *http.Request) {
	id, err := consumerFromPath(r)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	c, err := s.vault.GetConsumer(r.Context(), id)
	if err != nil && !errors.Is(err, state.ErrConsumerNotFound) {
		s.vaultFail(w, r, err)
		return
	}
	conns, err := s.cfg.Store.ListConsumer(r.Context(), id)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	if c == nil && len(conns) == 0 {
		s.vaultFail(w, r, errNoConsumer)
		return
	}
	if c == nil {
		c = &state.Consumer{ID: id}
	}
	v := s.consumerView(r, c)
	s.withConnections(&v, conns)
	writeVault(w, http.StatusOK, v)
}

func (s *server) vaultUpdateConsumer(w http.ResponseWriter, r *http.Request) {
	id, err := consumerFromPath(r)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	var body vaultConsumerBody
	if err := s.decodeLenient(w, r, &body); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	if err := checkConsumerMetadata(body.Metadata); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	c, err := s.vault.UpdateConsumer(r.Context(), id, body.Metadata)
	if errors.Is(err, state.ErrConsumerNotFound) {
		// A consumer known by its connections only gets a record now.
		var conns []*state.Connection
		if conns, err = s.cfg.Store.ListConsumer(r.Context(), id); err == nil {
			if len(conns) == 0 {
				err = errNoConsumer
			} else if _, err = s.vault.EnsureConsumer(r.Context(), id); err == nil {
				c, err = s.vault.UpdateConsumer(r.Context(), id, body.Metadata)
			}
		}
	}
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	writeVault(w, http.StatusOK, s.consumerView(r, c))
}

type vaultDeleteConsumerData struct {
	ConsumerID string `json:"consumer_id"`
}

// vaultDeleteConsumer removes the consumer, its connections and their
// credentials in one atomic step (the store appends a deleted event per
// connection).
func (s *server) vaultDeleteConsumer(w http.ResponseWriter, r *http.Request) {
	id, err := consumerFromPath(r)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	changes, err := s.vault.DeleteConsumer(r.Context(), id)
	if errors.Is(err, state.ErrConsumerNotFound) {
		err = errNoConsumer
	}
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	for _, ch := range changes {
		s.notify(r, ch)
	}
	writeVault(w, http.StatusOK, vaultDeleteConsumerData{ConsumerID: id})
}
