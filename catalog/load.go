package catalog

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"

	"gopkg.in/yaml.v3"
)

//go:embed default.yaml
var defaultYAML []byte

// file is the top-level YAML document.
type file struct {
	Integrations []*Integration `yaml:"integrations"`
}

func parse(data []byte) (*Catalog, error) {
	var f file
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("catalog: empty document")
		}
		return nil, annotate(data, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("catalog: more than one YAML document")
	}
	return New(f.Integrations)
}

func load(path string) (*Catalog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

var lineRE = regexp.MustCompile(`^line (\d+):`)

// annotate names the integration and field in yaml.v3 type errors (unknown
// keys, wrong types, bad durations), which only carry a line number.
func annotate(data []byte, err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return fmt.Errorf("catalog: %w", err)
	}
	var doc yaml.Node
	if yaml.Unmarshal(data, &doc) != nil || len(doc.Content) == 0 {
		return fmt.Errorf("catalog: %w", err)
	}
	var items []*yaml.Node
	if top := doc.Content[0]; top.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(top.Content); i += 2 {
			if top.Content[i].Value == "integrations" && top.Content[i+1].Kind == yaml.SequenceNode {
				items = top.Content[i+1].Content
			}
		}
	}
	errs := make([]error, 0, len(te.Errors))
	for _, msg := range te.Errors {
		m := lineRE.FindStringSubmatch(msg)
		if m == nil {
			errs = append(errs, fmt.Errorf("catalog: %s", msg))
			continue
		}
		line, _ := strconv.Atoi(m[1])
		idx := -1
		for i, it := range items {
			if it.Line <= line && line <= lastLine(it) {
				idx = i
			}
		}
		if idx < 0 {
			errs = append(errs, fmt.Errorf("catalog: %s", msg))
			continue
		}
		who := itemName(items[idx], idx)
		if path := locate(items[idx], line, ""); path != "" {
			errs = append(errs, fmt.Errorf("catalog: %s: %s: %s", who, path, msg))
		} else {
			errs = append(errs, fmt.Errorf("catalog: %s: %s", who, msg))
		}
	}
	return errors.Join(errs...)
}

// itemName names the i-th integration node by its id, or by position.
func itemName(n *yaml.Node, i int) string {
	if n.Kind == yaml.MappingNode {
		for k := 0; k+1 < len(n.Content); k += 2 {
			if n.Content[k].Value == "id" && n.Content[k+1].Kind == yaml.ScalarNode && n.Content[k+1].Value != "" {
				return fmt.Sprintf("integration %q", n.Content[k+1].Value)
			}
		}
	}
	return fmt.Sprintf("integration #%d", i+1)
}

// lastLine is the last line a node or its children start on.
func lastLine(n *yaml.Node) int {
	l := n.Line
	for _, c := range n.Content {
		l = max(l, lastLine(c))
	}
	return l
}

// locate returns the dotted path of the deepest key or value on the line.
func locate(n *yaml.Node, line int, prefix string) string {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if prefix != "" {
				p = prefix + "." + k.Value
			}
			if d := locate(v, line, p); d != "" {
				return d
			}
			if k.Line == line {
				return p
			}
		}
	case yaml.SequenceNode:
		for i, v := range n.Content {
			if d := locate(v, line, fmt.Sprintf("%s[%d]", prefix, i)); d != "" {
				return d
			}
		}
	case yaml.ScalarNode, yaml.AliasNode:
		if n.Line == line {
			return prefix
		}
	}
	return ""
}

// New validates integrations, fills in their defaults (in place) and
// returns them as a catalog. Parse uses it; tests and dev setups that build
// integrations in Go use it too.
func New(integrations []*Integration) (*Catalog, error) {
	if len(integrations) == 0 {
		return nil, errors.New("catalog: no integrations")
	}
	var errs []error
	seen := make(map[string]bool, len(integrations))
	for i, in := range integrations {
		if in == nil {
			errs = append(errs, fmt.Errorf("catalog: integration #%d: empty entry", i+1))
			continue
		}
		if err := in.validate(i); err != nil {
			errs = append(errs, err)
		}
		if in.ID != "" && seen[in.ID] {
			errs = append(errs, fmt.Errorf("catalog: integration %q: id: duplicate id", in.ID))
		}
		seen[in.ID] = true
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	c := &Catalog{Integrations: integrations, byID: make(map[string]*Integration, len(integrations))}
	for _, in := range integrations {
		in.applyDefaults()
		c.byID[in.ID] = in
	}
	return c, nil
}

func (c *Catalog) get(id string) (*Integration, bool) {
	if c == nil {
		return nil, false
	}
	if c.byID != nil {
		in, ok := c.byID[id]
		return in, ok
	}
	for _, in := range c.Integrations {
		if in != nil && in.ID == id {
			return in, true
		}
	}
	return nil, false
}

// IDs returns the integration ids in file order.
func (c *Catalog) IDs() []string {
	if c == nil {
		return nil
	}
	ids := make([]string, 0, len(c.Integrations))
	for _, in := range c.Integrations {
		ids = append(ids, in.ID)
	}
	return ids
}

// ByUnifiedAPI returns the integrations of one unified API (crm, hris,
// ...) in file order.
func (c *Catalog) ByUnifiedAPI(api string) []*Integration {
	if c == nil {
		return nil
	}
	var out []*Integration
	for _, in := range c.Integrations {
		if in.UnifiedAPI == api {
			out = append(out, in)
		}
	}
	return out
}

// Lookup returns the integration for a connection's unified API and
// service id. An unknown service, or one that belongs to another unified
// API, is an error wrapping ErrUnknownIntegration that names the pair.
func (c *Catalog) Lookup(unifiedAPI, serviceID string) (*Integration, error) {
	in, ok := c.get(serviceID)
	if !ok || in.UnifiedAPI != unifiedAPI {
		return nil, fmt.Errorf("%w: %q", ErrUnknownIntegration, unifiedAPI+"+"+serviceID)
	}
	return in, nil
}

// UnifiedAPIs returns the unified APIs of the catalog, sorted.
func (c *Catalog) UnifiedAPIs() []string {
	if c == nil {
		return nil
	}
	var out []string
	for _, in := range c.Integrations {
		if !slices.Contains(out, in.UnifiedAPI) {
			out = append(out, in.UnifiedAPI)
		}
	}
	slices.Sort(out)
	return out
}
