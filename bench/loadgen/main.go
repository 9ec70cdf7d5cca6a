// Command loadgen is the open-loop HTTP load generator used by bench/http_bench.py.
//
// It exists because the benchmark needs three things at once: a constant offered rate that does not
// slow down when the server does (open loop), latency measured from each request's intended send time
// (so coordinated omission cannot hide queueing), and a different body and different headers on every
// request (distinct idempotency keys, several merchants' API keys, replays). oha has the first two but
// only static headers; vegeta has all three but is not reachable from this build's module proxy. The
// program uses the Go standard library only, so building it needs no download.
//
// Targets are JSON lines: {"method": "POST", "url": "...", "headers": {"K": "V"}, "body": "..."}.
// A target URL that starts with "/" is joined to -base. The literal "{run}" in a header value is
// replaced by -run, and "{cycle}" by how many times the file has been wrapped around, so one targets
// file gives fresh idempotency keys at every offered rate and on every pass while keeping its planned
// replays (repeated lines) intact.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type target struct {
	Method  string            `json:"method"`
	URL     string            `json:"url"`
	Headers map[string]string `json:"headers"`
	Body    string            `json:"body"`
}

type sample struct {
	intendedNs int64 // intended send time, relative to the start of the run
	sendLagNs  int64 // actual send time minus intended send time
	doneNs     int64 // completion time minus intended send time (corrected latency)
	serviceNs  int64 // completion time minus actual send time (uncorrected latency)
	status     int   // HTTP status, 0 for a transport error or timeout
	errKind    string
}

type percentiles struct {
	P50   float64 `json:"p50_ms"`
	P90   float64 `json:"p90_ms"`
	P99   float64 `json:"p99_ms"`
	P999  float64 `json:"p999_ms"`
	Max   float64 `json:"max_ms"`
	Mean  float64 `json:"mean_ms"`
	Count int     `json:"count"`
}

type summary struct {
	OfferedRate      float64            `json:"offered_rate"`
	DurationS        float64            `json:"duration_s"`
	Planned          int                `json:"planned"`
	Sent             int                `json:"sent"`
	Completed        int                `json:"completed"`
	AchievedRate     float64            `json:"achieved_rate"`
	Errors           int                `json:"errors"`
	ErrorRate        float64            `json:"error_rate"`
	StatusCounts     map[string]int     `json:"status_counts"`
	ErrorKinds       map[string]int     `json:"error_kinds"`
	Latency          percentiles        `json:"latency_corrected"`
	ServiceLatency   percentiles        `json:"latency_uncorrected"`
	SendLag          percentiles        `json:"send_lag"`
	HistogramEdgesMs []float64          `json:"histogram_edges_ms"`
	HistogramCounts  []int              `json:"histogram_counts"`
	MaxConnections   int                `json:"max_connections"`
	OkStatuses       []int              `json:"ok_statuses"`
	Extra            map[string]float64 `json:"extra"`
}

func loadTargets(path string) ([]target, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []target
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var t target
		if err := json.Unmarshal(line, &t); err != nil {
			return nil, fmt.Errorf("targets line %d: %w", len(out)+1, err)
		}
		if t.Method == "" {
			t.Method = "GET"
		}
		out = append(out, t)
	}
	return out, sc.Err()
}

func pct(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	idx := int(math.Ceil(q*float64(len(sorted)))) - 1
	if idx < 0 {
		idx = 0
	}
	if idx >= len(sorted) {
		idx = len(sorted) - 1
	}
	return float64(sorted[idx]) / 1e6
}

func summarize(values []int64) percentiles {
	if len(values) == 0 {
		return percentiles{}
	}
	sort.Slice(values, func(i, j int) bool { return values[i] < values[j] })
	var sum float64
	for _, v := range values {
		sum += float64(v)
	}
	return percentiles{
		P50: pct(values, 0.50), P90: pct(values, 0.90), P99: pct(values, 0.99), P999: pct(values, 0.999),
		Max: float64(values[len(values)-1]) / 1e6, Mean: sum / float64(len(values)) / 1e6, Count: len(values),
	}
}

func classify(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case strings.Contains(err.Error(), "connection refused"):
		return "connection_refused"
	case strings.Contains(err.Error(), "reset by peer"):
		return "connection_reset"
	case strings.Contains(err.Error(), "EOF"):
		return "eof"
	default:
		return "other"
	}
}

func main() {
	targetsPath := flag.String("targets", "", "JSON-lines targets file")
	rate := flag.Float64("rate", 1000, "offered rate, requests per second")
	duration := flag.Duration("duration", 5*time.Second, "how long to offer load")
	timeout := flag.Duration("timeout", 2*time.Second, "per-request timeout")
	maxConns := flag.Int("connections", 512, "maximum concurrent connections")
	run := flag.String("run", "r0", "value substituted for {run} in header values")
	base := flag.String("base", "", "base URL for targets whose URL starts with /")
	okList := flag.String("ok", "200,201,202,402,409", "HTTP statuses that are expected outcomes, not errors")
	flag.Parse()
	if *targetsPath == "" || *rate <= 0 || *duration <= 0 {
		fmt.Fprintln(os.Stderr, "usage: loadgen -targets FILE -rate N -duration D")
		os.Exit(2)
	}
	targets, err := loadTargets(*targetsPath)
	if err != nil || len(targets) == 0 {
		fmt.Fprintln(os.Stderr, "cannot load targets:", err)
		os.Exit(2)
	}
	ok := map[int]bool{}
	var okStatuses []int
	for _, s := range strings.Split(*okList, ",") {
		var v int
		if _, err := fmt.Sscanf(strings.TrimSpace(s), "%d", &v); err == nil {
			ok[v] = true
			okStatuses = append(okStatuses, v)
		}
	}
	// Pre-build the per-request header sets once so the send loop does no string work.
	type prepared struct {
		method string
		url    string
		header http.Header
		body   []byte
		cycled []string // header names whose value contains {cycle}
	}
	reqs := make([]prepared, len(targets))
	for i, t := range targets {
		h := http.Header{}
		var cycled []string
		for k, v := range t.Headers {
			h.Set(k, strings.ReplaceAll(v, "{run}", *run))
			if strings.Contains(v, "{cycle}") {
				cycled = append(cycled, k)
			}
		}
		url := t.URL
		if strings.HasPrefix(url, "/") {
			url = strings.TrimRight(*base, "/") + url
		}
		reqs[i] = prepared{t.Method, url, h, []byte(t.Body), cycled}
	}

	// Each target is serialised to HTTP/1.1 bytes once; only {cycle} is filled in per request.
	u, err := url.Parse(reqs[0].url)
	if err != nil || u.Host == "" {
		fmt.Fprintln(os.Stderr, "targets need absolute URLs or -base:", err)
		os.Exit(2)
	}
	host := u.Host
	wire := make([][]byte, len(reqs))
	for i := range reqs {
		wire[i] = serialise(&reqs[i].method, reqs[i].url, reqs[i].header, reqs[i].body, host)
	}

	planned := int(*rate * duration.Seconds())
	if planned < 1 {
		planned = 1
	}
	samples := make([]sample, planned)
	for i := range samples {
		samples[i].errKind = "not_sent"
	}
	queue := make(chan int, planned)
	var sent atomic.Int64
	var wg sync.WaitGroup
	intervalNs := 1e9 / *rate
	start := time.Now()
	deadline := start.Add(*duration + *timeout)
	for w := 0; w < *maxConns; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &conn{addr: host, timeout: *timeout}
			defer c.close()
			for i := range queue {
				if time.Now().After(deadline) {
					continue // past the run's bound: left as not_sent
				}
				s := &samples[i]
				s.intendedNs = int64(float64(i) * intervalNs)
				cycle := i / len(reqs)
				msg := wire[i%len(reqs)]
				if cycle > 0 && len(reqs[i%len(reqs)].cycled) > 0 {
					msg = bytes.ReplaceAll(msg, []byte("{cycle}"), []byte(strconv.Itoa(cycle)))
				} else if len(reqs[i%len(reqs)].cycled) > 0 {
					msg = bytes.ReplaceAll(msg, []byte("{cycle}"), []byte("0"))
				}
				sendAt := time.Since(start).Nanoseconds()
				sent.Add(1)
				status, err := c.roundTrip(msg)
				end := time.Since(start).Nanoseconds()
				s.serviceNs = end - sendAt
				s.doneNs = end - s.intendedNs
				s.status = status
				s.errKind = ""
				if err != nil {
					s.status = 0
					s.errKind = classify(err)
				}
			}
		}()
	}
	// The scheduler releases every request whose intended time has passed, then sleeps briefly; it
	// never waits for a response, so a slow server cannot lower the offered rate. Its own lateness
	// is the generator's send lag; time spent waiting for a free connection counts against the server.
	for i := 0; i < planned; {
		elapsed := time.Since(start).Nanoseconds()
		due := int(float64(elapsed)/intervalNs) + 1
		if due > planned {
			due = planned
		}
		for ; i < due; i++ {
			samples[i].sendLagNs = elapsed - int64(float64(i)*intervalNs)
			queue <- i
		}
		time.Sleep(50 * time.Microsecond)
	}
	close(queue)
	wg.Wait()
	wall := time.Since(start).Seconds()
	for i := range samples {
		if samples[i].errKind == "not_sent" {
			samples[i].intendedNs = int64(float64(i) * intervalNs)
			samples[i].doneNs = deadline.Sub(start).Nanoseconds() - samples[i].intendedNs
		}
	}

	sum := summary{
		OfferedRate: *rate, DurationS: duration.Seconds(), Planned: planned, Sent: int(sent.Load()),
		StatusCounts: map[string]int{}, ErrorKinds: map[string]int{}, MaxConnections: *maxConns,
		OkStatuses: okStatuses, Extra: map[string]float64{"wall_s": wall},
	}
	corrected := make([]int64, 0, planned)
	service := make([]int64, 0, planned)
	lag := make([]int64, 0, planned)
	// Log-spaced histogram from 10 us to 10 s, 20 buckets per decade.
	const bucketsPerDecade = 20
	nb := 6 * bucketsPerDecade
	edges := make([]float64, nb+1)
	for b := 0; b <= nb; b++ {
		edges[b] = 0.01 * math.Pow(10, float64(b)/bucketsPerDecade)
	}
	counts := make([]int, nb+2)
	var lastDone int64
	for i := range samples {
		s := &samples[i]
		corrected = append(corrected, s.doneNs)
		service = append(service, s.serviceNs)
		lag = append(lag, s.sendLagNs)
		if s.doneNs+s.intendedNs > lastDone {
			lastDone = s.doneNs + s.intendedNs
		}
		if s.status == 0 {
			sum.Errors++
			sum.ErrorKinds[s.errKind]++
			sum.StatusCounts["transport_error"]++
		} else {
			sum.Completed++
			sum.StatusCounts[fmt.Sprint(s.status)]++
			if !ok[s.status] {
				sum.Errors++
			}
		}
		ms := float64(s.doneNs) / 1e6
		b := 0
		if ms > edges[0] {
			b = int(math.Floor(math.Log10(ms/edges[0])*bucketsPerDecade)) + 1
			if b > nb+1 {
				b = nb + 1
			}
		}
		counts[b]++
	}
	sum.ErrorRate = float64(sum.Errors) / float64(planned)
	// Achieved rate counts successful answers over the span from the first intended send to the last
	// answer, so a server that falls behind and drains its backlog late shows a lower rate.
	if lastDone > 0 {
		sum.AchievedRate = float64(sum.Completed-(sum.Errors-sum.StatusCounts["transport_error"])) / (float64(lastDone) / 1e9)
	}
	sum.Latency = summarize(corrected)
	sum.ServiceLatency = summarize(service)
	sum.SendLag = summarize(lag)
	sum.HistogramEdgesMs = edges
	sum.HistogramCounts = counts
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(sum); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// serialise renders one request as HTTP/1.1 bytes with keep-alive.
func serialise(method *string, rawURL string, h http.Header, body []byte, host string) []byte {
	u, _ := url.Parse(rawURL)
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", *method, u.RequestURI(), host)
	for k, vs := range h {
		for _, v := range vs {
			fmt.Fprintf(&b, "%s: %s\r\n", k, v)
		}
	}
	if len(body) > 0 && h.Get("Content-Type") == "" {
		b.WriteString("Content-Type: application/json\r\n")
	}
	fmt.Fprintf(&b, "Content-Length: %d\r\n\r\n", len(body))
	b.Write(body)
	return b.Bytes()
}

// conn is one keep-alive connection, redialled after any error.
type conn struct {
	addr    string
	timeout time.Duration
	c       net.Conn
	r       *bufio.Reader
}

func (c *conn) close() {
	if c.c != nil {
		c.c.Close()
		c.c = nil
	}
}

func (c *conn) roundTrip(msg []byte) (int, error) {
	if c.c == nil {
		nc, err := net.DialTimeout("tcp", c.addr, c.timeout)
		if err != nil {
			return 0, err
		}
		if tc, ok := nc.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		c.c = nc
		c.r = bufio.NewReaderSize(nc, 16<<10)
	}
	c.c.SetDeadline(time.Now().Add(c.timeout))
	if _, err := c.c.Write(msg); err != nil {
		c.close()
		return 0, err
	}
	status, keep, err := readResponse(c.r)
	if err != nil || !keep {
		c.close()
	}
	return status, err
}

// readResponse reads one HTTP/1.1 response (Content-Length or chunked body) and discards the body.
func readResponse(r *bufio.Reader) (int, bool, error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		return 0, false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, false, fmt.Errorf("bad status line %q", line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, false, fmt.Errorf("bad status line %q", line)
	}
	length := -1
	chunked := false
	keep := true
	for {
		hl, err := r.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		if len(bytes.TrimSpace(hl)) == 0 {
			break
		}
		colon := bytes.IndexByte(hl, ':')
		if colon < 0 {
			continue
		}
		name := strings.ToLower(string(bytes.TrimSpace(hl[:colon])))
		value := strings.ToLower(string(bytes.TrimSpace(hl[colon+1:])))
		switch name {
		case "content-length":
			length, _ = strconv.Atoi(value)
		case "transfer-encoding":
			chunked = strings.Contains(value, "chunked")
		case "connection":
			keep = value != "close"
		}
	}
	switch {
	case chunked:
		for {
			sizeLine, err := r.ReadString('\n')
			if err != nil {
				return 0, false, err
			}
			size, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(sizeLine, ";", 2)[0]), 16, 64)
			if err != nil {
				return 0, false, err
			}
			if _, err := r.Discard(int(size) + 2); err != nil {
				return 0, false, err
			}
			if size == 0 {
				break
			}
		}
	case length >= 0:
		if _, err := r.Discard(length); err != nil {
			return 0, false, err
		}
	default:
		return status, false, nil
	}
	return status, keep, nil
}
