// Package deploy holds no code: it is where the tests of the deployment
// files live. They check deploy/prometheus (scrape config, alert rules and
// their promtool unit tests), deploy/grafana (the provisioned dashboard and
// datasource), deploy/metrics.txt (the metric families the fleet exports,
// which dashboards and rules may name), and the Dockerfile and
// docker-compose.yml at the repository root, with the real tools: promtool
// and docker-compose (.ci/run installs both).
package deploy
