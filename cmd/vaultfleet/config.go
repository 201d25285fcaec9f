package main

import (
	"cmp"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// kind is how the text of a setting is read. Every kind is strict: a value
// it does not accept whole (32abc, 25, yes) is an error naming the
// variable or flag it came from.
type kind int

const (
	// kindString is free text, checked by whatever uses it (a path).
	kindString kind = iota
	// kindSecret is free text never echoed (keys, tokens, Redis URLs,
	// which may hold a password): its consumer checks it and names the
	// variable without the value.
	kindSecret
	// kindInt is a whole number (strconv.Atoi).
	kindInt
	// kindFloat is a decimal number (strconv.ParseFloat).
	kindFloat
	// kindDuration is a Go duration like 25s or 2m (time.ParseDuration).
	kindDuration
	// kindBool is what strconv.ParseBool accepts: 1, t, T, TRUE, true,
	// True, 0, f, F, FALSE, false, False.
	kindBool
	// kindURL is an absolute http or https URL (never echoed: it may
	// hold userinfo).
	kindURL
	// kindAddr is a listen address, host:port (host may be empty).
	kindAddr
	// kindChoice is one of the setting's choices.
	kindChoice
	// kindRedisURL is a Redis URL, checked when Redis is opened (never
	// echoed: it may hold a password).
	kindRedisURL
)

// name is how the kind reads in help and in the README.
func (k kind) name() string {
	return [...]string{"string", "secret", "integer", "number", "duration", "boolean", "URL", "host:port", "choice", "Redis URL"}[k]
}

// setting is one row of the configuration table: a variable, its flag, or
// both (a flag wins over its variable).
type setting struct {
	env  string // environment variable; "" for a flag only
	flag string // flag name without dashes; "" for a variable only
	kind kind
	// cmds are the commands that read it.
	cmds []string
	// def is the default, as text; "" means unset (the command decides).
	def string
	// defs overrides def for some commands.
	defs map[string]string
	// defNote describes a default that is not a fixed value.
	defNote string
	// min and max bound ints, numbers and durations (in the kind's own
	// syntax; "" for none); positive requires a value above zero.
	min, max string
	positive bool
	choices  []string
	help     string
	// helps overrides help for some commands.
	helps map[string]string
	// docOnly rows document variables the reader does not read itself
	// (named by the catalog): help and README only.
	docOnly bool
}

// Command names, as the table lists them.
const (
	cmdDev       = "dev"
	cmdWorker    = "worker"
	cmdScheduler = "scheduler"
	cmdServe     = "serve"
	cmdEnqueue   = "enqueue"
	cmdReseal    = "reseal"
)

// key is how code asks for the setting's value: its flag, else its
// variable.
func (s *setting) key() string { return cmp.Or(s.flag, s.env) }

func (s *setting) usedBy(cmd string) bool { return slices.Contains(s.cmds, cmd) }

// defaultFor is the setting's default for cmd.
func (s *setting) defaultFor(cmd string) string {
	if d, ok := s.defs[cmd]; ok {
		return d
	}
	return s.def
}

func (s *setting) helpFor(cmd string) string {
	if h, ok := s.helps[cmd]; ok {
		return h
	}
	return s.help
}

// source names where a value came from, for errors: the flag when it was
// given, else the variable and its flag.
func (s *setting) source(fromFlag bool) string {
	switch {
	case fromFlag || s.env == "":
		return "--" + s.flag
	case s.flag == "":
		return s.env
	}
	return s.env + " (--" + s.flag + ")"
}

// parse reads text as the setting's kind and checks its bounds. The error
// says what is wrong without the source (the caller adds it) and echoes
// the value only for kinds that cannot hold a secret.
func (s *setting) parse(text string) (any, error) {
	switch s.kind {
	case kindString, kindSecret, kindRedisURL:
		return text, nil
	case kindInt:
		n, err := strconv.Atoi(text)
		if err != nil {
			return nil, fmt.Errorf("%q is not a whole number", text)
		}
		return n, s.checkBounds(float64(n), func(b string) (float64, error) {
			v, err := strconv.Atoi(b)
			return float64(v), err
		}, strconv.Itoa(n))
	case kindFloat:
		f, err := strconv.ParseFloat(text, 64)
		if err != nil || f != f { // NaN compares false with every bound
			return nil, fmt.Errorf("%q is not a number like 0.1", text)
		}
		return f, s.checkBounds(f, func(b string) (float64, error) { return strconv.ParseFloat(b, 64) }, text)
	case kindDuration:
		d, err := time.ParseDuration(text)
		if err != nil {
			return nil, fmt.Errorf("%q is not a duration like 25s or 2m", text)
		}
		return d, s.checkBounds(float64(d), func(b string) (float64, error) {
			v, err := time.ParseDuration(b)
			return float64(v), err
		}, d.String())
	case kindBool:
		b, err := strconv.ParseBool(text)
		if err != nil {
			return nil, fmt.Errorf("%q is not a boolean (want true or false, 1 or 0, t or f)", text)
		}
		return b, nil
	case kindURL:
		u, err := url.Parse(text)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, errors.New("not an absolute http or https URL (value not shown: it may hold a password)")
		}
		return text, nil
	case kindAddr:
		if _, port, err := net.SplitHostPort(text); err != nil || port == "" {
			return nil, fmt.Errorf("%q is not a listen address host:port (like :8080 or 127.0.0.1:8080)", text)
		}
		return text, nil
	case kindChoice:
		for _, c := range s.choices {
			if strings.EqualFold(text, c) {
				return c, nil
			}
		}
		return nil, fmt.Errorf("%q is not one of %s", text, strings.Join(s.choices, ", "))
	}
	return nil, fmt.Errorf("unknown kind %d", s.kind)
}

// boundsError is a value of the right kind out of its setting's bounds;
// it reads "must be ...".
type boundsError string

func (e boundsError) Error() string { return string(e) }

// checkBounds checks v against min, max and positive; shown is v as the
// user would write it.
func (s *setting) checkBounds(v float64, parse func(string) (float64, error), shown string) error {
	lo, hi := bound(s.min, parse), bound(s.max, parse)
	switch {
	case s.positive && v <= 0:
		return boundsError("must be positive, got " + shown)
	case lo != nil && hi != nil && (v < *lo || v > *hi):
		return boundsError(fmt.Sprintf("must be between %s and %s, got %s", s.min, s.max, shown))
	case lo != nil && v < *lo && *lo == 0:
		return boundsError("must not be negative, got " + shown)
	case lo != nil && v < *lo:
		return boundsError(fmt.Sprintf("must be at least %s, got %s", s.min, shown))
	case hi != nil && v > *hi:
		return boundsError(fmt.Sprintf("must be at most %s, got %s", s.max, shown))
	}
	return nil
}

// bound parses a bound of the table; a bound that does not parse is a
// programmer error that TestConfigTable catches.
func bound(text string, parse func(string) (float64, error)) *float64 {
	if text == "" {
		return nil
	}
	v, err := parse(text)
	if err != nil {
		panic(fmt.Sprintf("config table: bound %q: %v", text, err))
	}
	return &v
}

// config is the settings of one command, read from its flags and then its
// environment.
type config struct {
	cmd    string
	fs     *flag.FlagSet
	getenv func(string) string
	flags  map[string]*flagValue // by flag name
	values map[string]any        // by key; absent when unset without default
}

// flagValue is a flag of the table. It keeps the text given on the command
// line; config.parse reads it with the variables, so that a malformed flag
// and a malformed variable get the same one-line error (exit status 1),
// never an echo of a value that may be a secret.
type flagValue struct {
	s    *setting
	cmd  string
	text string
	set  bool
}

func (v *flagValue) String() string {
	if v == nil || v.s == nil {
		return ""
	}
	if v.set {
		return v.text
	}
	return v.s.defaultFor(v.cmd)
}

func (v *flagValue) Set(text string) error {
	v.text, v.set = strings.TrimSpace(text), true
	return nil
}

// IsBoolFlag lets a boolean flag stand alone (--monitor-readonly).
func (v *flagValue) IsBoolFlag() bool { return v.s != nil && v.s.kind == kindBool }

// newConfig returns the config of command cmd (title is its name in the
// usage: "enqueue validate"): a flag set with every flag of the table the
// command reads, and the variables behind them.
func newConfig(cmd, title, synopsis string, env Env) *config {
	fs := flag.NewFlagSet("vaultfleet "+title, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	c := &config{cmd: cmd, fs: fs, getenv: env.Getenv, flags: map[string]*flagValue{}, values: map[string]any{}}
	for i := range settings {
		s := &settings[i]
		if !s.usedBy(cmd) || s.flag == "" {
			continue
		}
		v := &flagValue{s: s, cmd: cmd}
		c.flags[s.flag] = v
		fs.Var(v, s.flag, s.helpFor(cmd))
	}
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "usage: vaultfleet %s [flags]\n\n%s\n\nflags:\n", title, synopsis)
		printFlags(w, cmd)
		fmt.Fprintln(w, "\nenvironment (a flag wins over its variable):")
		printEnv(w, cmd)
	}
	return c
}

// parse parses args, then reads every setting of the command: its flag
// when given, else its variable when set and not empty, else its default.
// Every malformed value is reported, in one line, naming where it came
// from.
func (c *config) parse(args []string) error {
	if err := c.fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if c.fs.NArg() > 0 {
		fmt.Fprintf(c.fs.Output(), "unexpected argument %q\n", c.fs.Arg(0))
		return errUsage
	}
	var errs []string
	for i := range settings {
		s := &settings[i]
		if !s.usedBy(c.cmd) || s.docOnly {
			continue
		}
		text, fromFlag := s.defaultFor(c.cmd), false
		if v := c.flags[s.flag]; v != nil && v.set {
			text, fromFlag = v.text, true
		} else if s.env != "" {
			if e := c.getenv(s.env); e != "" {
				text = e
				if s.kind != kindSecret && s.kind != kindRedisURL {
					text = strings.TrimSpace(e)
				}
			}
		}
		if text == "" && (!fromFlag || s.defaultFor(c.cmd) == "") {
			continue // unset, no default: the command decides
		}
		val, err := s.parse(text)
		if err != nil {
			sep := ": "
			if errors.As(err, new(boundsError)) {
				sep = " " // --batch must be ...
			}
			errs = append(errs, s.source(fromFlag)+sep+err.Error())
			continue
		}
		c.values[s.key()] = val
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// value returns the value of the setting with this key; a key the command
// does not read is a programmer error.
func (c *config) value(key string) (any, bool) {
	if !c.reads(key) {
		panic(fmt.Sprintf("config: %s does not read %s", c.cmd, key))
	}
	v, ok := c.values[key]
	return v, ok
}

// reads reports whether the command reads the setting with this key.
func (c *config) reads(key string) bool {
	return slices.ContainsFunc(settings, func(s setting) bool { return s.key() == key && s.usedBy(c.cmd) && !s.docOnly })
}

func (c *config) str(key string) string {
	v, _ := c.value(key)
	s, _ := v.(string)
	return s
}

// intOK returns an integer setting and whether it was set or has a
// default.
func (c *config) intOK(key string) (int, bool) {
	v, ok := c.value(key)
	n, _ := v.(int)
	return n, ok
}

func (c *config) int(key string) int { n, _ := c.intOK(key); return n }

func (c *config) float(key string) float64 {
	v, _ := c.value(key)
	f, _ := v.(float64)
	return f
}

func (c *config) duration(key string) time.Duration {
	v, _ := c.value(key)
	d, _ := v.(time.Duration)
	return d
}

func (c *config) bool(key string) bool {
	v, _ := c.value(key)
	b, _ := v.(bool)
	return b
}

// printFlags lists the command's flags with their variable and default.
func printFlags(w io.Writer, cmd string) {
	for _, s := range settings {
		if !s.usedBy(cmd) || s.flag == "" {
			continue
		}
		arg := s.kind.name()
		switch s.kind {
		case kindBool:
			arg = ""
		case kindChoice:
			arg = strings.Join(s.choices, "|")
		case kindString:
			arg = "string"
		}
		fmt.Fprintf(w, "  --%s %s\n", s.flag, arg)
		var extra []string
		if s.env != "" {
			extra = append(extra, "$"+s.env)
		}
		if d := describeDefault(&s, cmd); d != "" {
			extra = append(extra, "default "+d)
		}
		fmt.Fprintf(w, "        %s", s.helpFor(cmd))
		if len(extra) > 0 {
			fmt.Fprintf(w, " (%s)", strings.Join(extra, "; "))
		}
		fmt.Fprintln(w)
	}
}

// printEnv lists the command's variables: those of a flag by the flag,
// which documents them.
func printEnv(w io.Writer, cmd string) {
	for _, s := range settings {
		if !s.usedBy(cmd) || s.env == "" {
			continue
		}
		line := "same as --" + s.flag
		if s.flag == "" {
			line = s.helpFor(cmd)
			if d := describeDefault(&s, cmd); d != "" {
				line += " (default " + d + ")"
			}
		}
		fmt.Fprintf(w, "  %-31s %s\n", s.env, line)
	}
}

// describeDefault is the default for cmd as help shows it.
func describeDefault(s *setting, cmd string) string {
	if d := s.defaultFor(cmd); d != "" {
		return d
	}
	return s.defNote
}

// knownEnv reports whether the binary reads the environment variable name:
// a variable of the table, or an OAuth client credential the built-in
// catalog names (a catalog file given at run time may name others).
func knownEnv(name string) bool {
	for _, s := range settings {
		if s.env == name && !s.docOnly {
			return true
		}
	}
	return catalogEnv()[name]
}

// catalogEnv is the client credential variables of the built-in catalog.
var catalogEnv = sync.OnceValue(func() map[string]bool {
	out := map[string]bool{}
	cat, err := catalog.Default()
	if err != nil {
		return out
	}
	for _, in := range cat.Integrations {
		if in.OAuth == nil {
			continue
		}
		for _, name := range []string{in.OAuth.ClientIDEnv, in.OAuth.ClientSecretEnv} {
			if name != "" {
				out[name] = true
			}
		}
	}
	return out
})

// readmeTable renders the table as the README's Markdown table.
func readmeTable() string {
	var b strings.Builder
	b.WriteString("| variable | flag | kind | default | read by | meaning |\n|---|---|---|---|---|---|\n")
	for _, s := range settings {
		env, fl := "", ""
		if s.env != "" {
			env = "`" + s.env + "`"
			if s.docOnly {
				env = mdText(s.env)
			}
		}
		if s.flag != "" {
			fl = "`--" + s.flag + "`"
		}
		var cmds []string
		meaning := s.help
		for _, c := range commands {
			if s.usedBy(c.name) {
				cmds = append(cmds, c.name)
			}
			if h, ok := s.helps[c.name]; ok {
				meaning += "; " + c.name + ": " + h
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", env, fl, s.kindDoc(), mdText(s.defaultDoc()),
			strings.Join(cmds, ", "), mdText(meaning))
	}
	return b.String()
}

// kindDoc is the kind with its bounds, for the README.
func (s *setting) kindDoc() string {
	k := s.kind.name()
	switch {
	case s.kind == kindChoice:
		return "one of `" + strings.Join(s.choices, "`, `") + "`"
	case s.positive:
		return k + " > 0"
	case s.min != "" && s.max != "":
		return k + " " + s.min + " to " + s.max
	case s.min != "":
		return k + " ≥ " + s.min
	case s.max != "":
		return k + " ≤ " + s.max
	}
	return k
}

// defaultDoc is the default of every command, for the README.
func (s *setting) defaultDoc() string {
	show := func(v string) string {
		if v == "" {
			return s.defNote
		}
		return "`" + v + "`"
	}
	var parts []string
	if slices.ContainsFunc(s.cmds, func(c string) bool { _, ok := s.defs[c]; return !ok }) {
		if d := show(s.def); d != "" {
			parts = append(parts, d)
		}
	}
	for _, c := range s.cmds {
		if v, ok := s.defs[c]; ok {
			parts = append(parts, c+": "+show(v))
		}
	}
	return strings.Join(parts, "; ")
}

// mdText escapes text for a Markdown table cell.
func mdText(s string) string {
	return strings.NewReplacer("|", `\|`, "<", "&lt;", ">", "&gt;").Replace(s)
}
