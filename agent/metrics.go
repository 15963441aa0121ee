package agent

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/onebox-project/onebox/fabric/membership"
)

// metrics lives on a private registry: nothing from other packages' global
// registrations leaks in, and tests can run several agents in one process.
type metrics struct {
	reg            *prometheus.Registry
	requests       *prometheus.CounterVec
	latency        *prometheus.HistogramVec
	joins          *prometheus.CounterVec
	fabricRejected *prometheus.CounterVec
	memberEvents   *prometheus.CounterVec
	peerFetch      *prometheus.HistogramVec
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_api_requests_total", Help: "Control API requests by listener side, endpoint and HTTP code.",
		}, []string{"side", "endpoint", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "onebox_api_request_duration_seconds", Help: "Control API request latency.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}, []string{"side", "endpoint"}),
		joins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_join_requests_total", Help: "Join requests served, by result (ok, bad_token, name_taken, bad_request, internal).",
		}, []string{"result"}),
		fabricRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_fabric_rejected_connections_total", Help: "Fabric port connections dropped before a handler: failed TLS handshake (no or wrong certificate, garbage), unknown protocol, or too many pending.",
		}, []string{"reason"}),
		memberEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_member_events_total", Help: "Membership events seen (join, leave, failed, update, reap).",
		}, []string{"kind"}),
		peerFetch: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "onebox_peer_request_duration_seconds", Help: "Requests to other members over mutual TLS, by result.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}, []string{"result"}),
	}
	m.reg.MustRegister(m.requests, m.latency, m.joins, m.fabricRejected, m.memberEvents, m.peerFetch,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&stateCollector{a: a})
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

func (m *metrics) observeRequest(side, endpoint string, code int, d time.Duration) {
	m.requests.WithLabelValues(side, endpoint, strconv.Itoa(code)).Inc()
	m.latency.WithLabelValues(side, endpoint).Observe(d.Seconds())
}

// stateCollector reads membership and resources at scrape time, so the
// gauges are never stale and nothing has to remember to update them.
type stateCollector struct{ a *Agent }

var (
	descMembers = prometheus.NewDesc("onebox_members", "Cluster members by status, as seen by this node.", []string{"status"}, nil)
	descCPUs    = prometheus.NewDesc("onebox_node_cpus", "CPUs this node contributes.", nil, nil)
	descMem     = prometheus.NewDesc("onebox_node_memory_bytes", "This node's memory (total, free = MemAvailable).", []string{"kind"}, nil)
	descLoad    = prometheus.NewDesc("onebox_node_load1", "One-minute load average.", nil, nil)
	descPool    = prometheus.NewDesc("onebox_pool_bytes", "This node's share of the cluster memory pool (donated, used).", []string{"kind"}, nil)
	descUp      = prometheus.NewDesc("onebox_agent_start_time_seconds", "When the agent started (Unix time).", nil, nil)
	// Gossip statuses only: suspect is the observer's own view at query
	// time (see membership.StatusSuspect), not a state to count here.
	statusesShown = []membership.Status{membership.StatusAlive, membership.StatusFailed, membership.StatusLeaving, membership.StatusLeft}
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descMembers, descCPUs, descMem, descLoad, descPool, descUp} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	if a.members != nil {
		count := map[membership.Status]int{}
		for _, m := range a.members.Members() {
			count[m.Status]++
		}
		for _, s := range statusesShown {
			ch <- prometheus.MustNewConstMetric(descMembers, prometheus.GaugeValue, float64(count[s]), string(s))
		}
	}
	r := a.refreshResources()
	ch <- prometheus.MustNewConstMetric(descCPUs, prometheus.GaugeValue, float64(r.CPUs))
	ch <- prometheus.MustNewConstMetric(descMem, prometheus.GaugeValue, float64(r.MemTotalBytes), "total")
	ch <- prometheus.MustNewConstMetric(descMem, prometheus.GaugeValue, float64(r.MemFreeBytes), "free")
	ch <- prometheus.MustNewConstMetric(descLoad, prometheus.GaugeValue, r.Load1)
	ch <- prometheus.MustNewConstMetric(descPool, prometheus.GaugeValue, float64(a.cfg.DonateMemory), "donated")
	ch <- prometheus.MustNewConstMetric(descPool, prometheus.GaugeValue, float64(a.memUsed()), "used")
	ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, float64(a.started.Unix()))
}
