# HubSpot associations against the fake portal in test/fake_hubspot.py:
#   1. 'contacts/companies' and 'deals/contacts' collections fill association tables that
#      equal the fake's truth exactly (one row per from, to, association type; labels);
#   2. an added association, removed ones, a changed primary company and an archived contact
#      reach the tables after a full walk, and records_deleted counts the rows removed;
#   3. sync.status shows the association collections syncing with last_sweep_at, and the
#      association lag (change -> table) stays below a bound derived from the page count;
#   4. malformed association collections fail at add_collection time.
# Expected rows come from the fake's admin API (its truth), never from the extension.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
my $token = 'pat-na1-11111111-2222-3333-4444-555555555555';    # the fake's --private-app-token default
my $rps = 4;
my $node;    # set up below; start_fake, admin, sql, wait_sql, status_of etc. are in SyncTest.pm
# No keep-alive for admin(): on a kept-alive connection each admin call stalls ~40 ms
# (delayed ACK), and the truth takes ~500 of them.
http_options(keep_alive => 0);

# ---------------------------------------------------------------------------
# Helpers: the fake's truth
# ---------------------------------------------------------------------------

my %label_of;    # "from/to/typeId" -> label or undef

# The fake's truth for one association collection: "from:to:typeId" -> row, ids as numbers.
sub truth
{
	my ($fake, $from, $to) = @_;
	my %rows;
	for my $rec (@{ admin($fake, 'GET', "records/$from") })
	{
		for my $link (@{ admin($fake, 'GET', "associations/$from/$rec->{id}/$to") })
		{
			for my $type (@{ $link->{typeIds} })
			{
				my ($f, $t, $ty) = (0 + $rec->{id}, 0 + $link->{toObjectId}, 0 + $type);
				die "no association type $from/$to/$ty" unless exists $label_of{"$from/$to/$ty"};
				$rows{"$f:$t:$ty"} = { from_id => $f, to_id => $t, type_id => $ty,
					label => $label_of{"$from/$to/$ty"} };
			}
		}
	}
	return \%rows;
}

# ---------------------------------------------------------------------------
# Helpers: the database
# ---------------------------------------------------------------------------

sub describe_row
{
	my ($k, $r) = @_;
	return "$k label=" . ($r->{label} // 'NULL');
}

# Compare an association table with the fake's truth: set equality, no duplicates.
sub compare_assoc
{
	my ($what, $table, $truth) = @_;
	my $rows = $json->decode(sql(
		"SELECT coalesce(json_agg(json_build_object('id', id, 'from_id', from_id, 'to_id', to_id, "
		  . "'type_id', type_id, 'label', label) ORDER BY from_id, to_id, type_id), '[]') FROM $table"));
	my (%got, @dup, @bad_id, @missing, @extra, @diff);
	for my $r (@$rows)
	{
		my $k = (0 + $r->{from_id}) . ':' . (0 + $r->{to_id}) . ':' . (0 + $r->{type_id});
		push @dup, $k if $got{$k};
		push @bad_id, "$r->{id} for $k" if $r->{id} ne $k;
		$got{$k} = $r;
	}
	for my $k (sort keys %$truth)
	{
		if (!$got{$k})
		{
			push @missing, describe_row($k, $truth->{$k});
			next;
		}
		my ($g, $w) = ($got{$k}{label} // "\0NULL", $truth->{$k}{label} // "\0NULL");
		push @diff, "$k: label table " . ($got{$k}{label} // 'NULL') . ', fake ' . ($truth->{$k}{label} // 'NULL')
		  if $g ne $w;
	}
	for my $k (sort keys %got)
	{
		push @extra, describe_row($k, $got{$k}) unless $truth->{$k};
	}
	my $n = scalar(keys %$truth);
	is(scalar(@$rows), $n, "$what: $n rows");
	is(scalar(@dup), 0, "$what: no association twice") or diag("twice: @dup[0 .. ($#dup < 9 ? $#dup : 9)]");
	is(scalar(@bad_id), 0, "$what: id is from:to:typeId") or diag(join("\n", @bad_id[0 .. ($#bad_id < 9 ? $#bad_id : 9)]));
	is(scalar(@missing), 0, "$what: no association of the fake missing")
	  or diag("missing:\n" . join("\n", @missing[0 .. ($#missing < 9 ? $#missing : 9)]));
	is(scalar(@extra), 0, "$what: no row the fake does not have")
	  or diag("extra:\n" . join("\n", @extra[0 .. ($#extra < 9 ? $#extra : 9)]));
	is(scalar(@diff), 0, "$what: every label equals the fake's") or diag(join("\n", @diff[0 .. ($#diff < 9 ? $#diff : 9)]));
	return \%got;
}

# Wait until a walk that began after $since (a database timestamp) has ended, i.e. two
# walk ends past $since: the first may have read its pages before the change.
sub wait_full_walk
{
	my ($collection, $since) = @_;
	my $q = "SELECT last_sweep_at > '%s' FROM sync.status WHERE source = 'crm' AND collection = '$collection'";
	return 0 unless wait_sql(90, sprintf($q, $since));
	my $first = sql("SELECT last_sweep_at FROM sync.status WHERE source = 'crm' AND collection = '$collection'");
	return wait_sql(90, sprintf($q, $first));
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

my $F = start_fake('hubspot', 'a', '--contacts', 400, '--companies', 60, '--deals', 100, '--seed', 6);

$node = start_node(max_backoff => 4);    # and CREATE EXTENSION sync

for my $t (@{ admin($F, 'GET', 'association_types') })
{
	$label_of{"$t->{fromType}/$t->{toType}/$t->{typeId}"} = $t->{label};
}

my $cc_truth = truth($F, 'contacts', 'companies');
my $dc_truth = truth($F, 'deals', 'contacts');
my @contacts = @{ admin($F, 'GET', 'records/contacts') };
my @deals = @{ admin($F, 'GET', 'records/deals') };
my @companies = @{ admin($F, 'GET', 'records/companies') };
is(scalar(@contacts), 400, 'the fake holds 400 live contacts');
{
	# Preconditions: the data has what the comparison must tell apart.
	my %with_company = map { $_->{from_id} => 1 } values %$cc_truth;
	my @labelled = grep { defined $_->{label} } values %$cc_truth;
	my @unlabelled = grep { !defined $_->{label} } values %$cc_truth;
	cmp_ok(scalar(@labelled), '>=', 50, 'the fake has labelled (Primary) contact->company associations');
	cmp_ok(scalar(@unlabelled), '>=', 50, 'and unlabelled ones');
	cmp_ok(scalar(@contacts) - scalar(keys %with_company), '>=', 20,
		'some contacts have no company (batch reads answer 207 NO_ASSOCIATIONS_FOUND)');
	cmp_ok(scalar(keys %$dc_truth), '>=', 30, 'deals have contact associations');
	my %digits = map { length($_->{id}) => 1 } @contacts;
	cmp_ok(scalar(keys %digits), '>=', 2, 'contact ids cross a digit-count boundary (compared as numbers)');
}
admin($F, 'DELETE', 'requests');

# ---------------------------------------------------------------------------
# 1. The first walk fills the association tables
# ---------------------------------------------------------------------------

sql("SELECT sync.create_source('crm', 'hubspot', '$F->{url}', '{\"access_token\": \"$token\"}', "
	  . "'{\"requests_per_second\": $rps}')");
is(sql("SELECT sync.add_collection('crm', 'contacts/companies')"), 'crm.contacts_companies',
	"add_collection('contacts/companies') creates crm.contacts_companies");
is(sql("SELECT sync.add_collection('crm', 'deals/contacts')"), 'crm.deals_contacts',
	"add_collection('deals/contacts') creates crm.deals_contacts");
is(sql("SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) "
	  . "FROM pg_attribute WHERE attrelid = 'crm.contacts_companies'::regclass AND attnum > 0 AND NOT attisdropped"),
	'id text, from_id bigint, to_id bigint, type_id integer, label text, _synced_at timestamp with time zone',
	'association table columns');
is(sql("SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
	  . "AND a.attnum = ANY (i.indkey) WHERE i.indrelid = 'crm.contacts_companies'::regclass AND i.indisprimary"),
	'id', 'id is the primary key');

my $t_backfill = time;
is(sql("SELECT sync.wait_for_backfill('crm', 'contacts/companies', '120s')"), 't',
	'contacts/companies: the first walk completes');
is(sql("SELECT sync.wait_for_backfill('crm', 'deals/contacts', '120s')"), 't',
	'deals/contacts: the first walk completes');
note(sprintf('first walks took %.1fs (at %s)', time - $t_backfill, elapsed()));

# The tables may already hold a second walk's rows; nothing changed, so they must equal the truth.
compare_assoc('contacts/companies after the first walk', 'crm.contacts_companies', $cc_truth);
compare_assoc('deals/contacts after the first walk', 'crm.deals_contacts', $dc_truth);

{
	my $log = admin($F, 'GET', 'requests');
	my @batch = grep { $_->{method} eq 'POST' && $_->{path} eq '/crm/v4/associations/contacts/companies/batch/read' } @$log;
	my @lists = grep { $_->{method} eq 'GET' && $_->{path} eq '/crm/v3/objects/contacts' } @$log;
	cmp_ok(scalar(@batch), '>=', 4, 'contacts/companies batch reads were made (' . scalar(@batch) . ')');
	my @oversize = grep { my $n = scalar(@{ $_->{body}{inputs} // [] }); $n < 1 || $n > 100 } @batch;
	is(scalar(@oversize), 0, 'every batch read asks for 1..100 ids');
	ok(scalar(grep { $_->{status} == 207 } @batch), 'some batch reads answered 207 (ids without associations)');
	my @failed = grep { $_->{status} >= 400 } @$log;
	is(scalar(@failed), 0, 'no API request failed') or diag(join("\n", map { "$_->{method} $_->{path} -> $_->{status}" } @failed[0 .. ($#failed < 9 ? $#failed : 9)]));
	ok(scalar(grep { ($_->{query} // '') =~ /(^|&)limit=100(&|$)/ } @lists) == scalar(@lists) && @lists >= 4,
		'the id walk lists contacts 100 at a time');
}

for my $c ('contacts/companies', 'deals/contacts')
{
	my $st = status_of('crm', $c);
	is($st->{records_deleted}, 0, "$c: nothing deleted while nothing changed");
	is($st->{consecutive_failures}, 0, "$c: no failures");
}
my $walk_rows = scalar(keys %$cc_truth);
is(status_of('crm', 'contacts/companies')->{backfill_records}, $walk_rows,
	"contacts/companies: backfill_records counts the first walk's $walk_rows rows");

# ---------------------------------------------------------------------------
# 2. Changes: add, remove, change a primary company; measure the lag
# ---------------------------------------------------------------------------

my %cc_by_contact;
push @{ $cc_by_contact{ $_->{from_id} } }, $_ for values %$cc_truth;
my %dc_by_deal;
push @{ $dc_by_deal{ $_->{from_id} } }, $_ for values %$dc_truth;

# A contact with a primary company, moved to a company it has no association with.
my ($move_c) = grep { my $c = $_; grep { $_->{type_id} == 1 } @{ $cc_by_contact{$c} } } sort { $a <=> $b } keys %cc_by_contact;
my ($old_primary) = map { $_->{to_id} } grep { $_->{type_id} == 1 } @{ $cc_by_contact{$move_c} };
my %linked = map { $_->{to_id} => 1 } @{ $cc_by_contact{$move_c} };
my ($new_primary) = grep { !$linked{$_} } map { 0 + $_->{id} } @companies;
# A contact without companies gets a labelled ("Former employee") association.
my %has_company = map { $_ => 1 } keys %cc_by_contact;
my ($add_c) = grep { !$has_company{$_} } map { 0 + $_->{id} } reverse @contacts;
my $add_company = 0 + $companies[-1]{id};
# A contact whose whole company association (all types) is removed.
my ($rm_c) = grep { $_ != $move_c && @{ $cc_by_contact{$_} } >= 2 } sort { $b <=> $a } keys %cc_by_contact;
my ($rm_company) = map { $_->{to_id} } @{ $cc_by_contact{$rm_c} };
# deals/contacts: one removed, one added.
my ($rm_d) = sort { $a <=> $b } keys %dc_by_deal;
my $rm_d_contact = $dc_by_deal{$rm_d}[0]{to_id};
my %deal_linked = map { $_->{to_id} => 1 } @{ $dc_by_deal{$rm_d} };
my ($add_d_contact) = grep { !$deal_linked{$_} } map { 0 + $_->{id} } @contacts;
# A contact (with companies and deals) archived: its rows go from both tables.
my %deal_contact = map { $_->{to_id} => 1 } values %$dc_truth;
my %taken = map { $_ => 1 } grep { defined } ($move_c, $add_c, $rm_c, $add_d_contact, $rm_d_contact);
my ($arch_c) = grep { $deal_contact{$_} && !$taken{$_} } sort { $a <=> $b } keys %cc_by_contact;
ok(defined $move_c && defined $new_primary && defined $add_c && defined $rm_c && defined $rm_d
	  && defined $add_d_contact && defined $arch_c, 'picked the records to change')
  or BAIL_OUT('no suitable records in the fake');

my $t_change = sql('SELECT clock_timestamp()');
my $t0 = time;
admin($F, 'PUT', 'associations',
	{ fromType => 'contacts', fromId => "$move_c", toType => 'companies', toId => "$new_primary", typeId => 1 });
admin($F, 'PUT', 'associations',
	{ fromType => 'contacts', fromId => "$add_c", toType => 'companies', toId => "$add_company", typeId => 101 });
admin($F, 'DELETE', 'associations',
	{ fromType => 'contacts', fromId => "$rm_c", toType => 'companies', toId => "$rm_company" });
admin($F, 'DELETE', 'associations',
	{ fromType => 'deals', fromId => "$rm_d", toType => 'contacts', toId => "$rm_d_contact" });
admin($F, 'PUT', 'associations',
	{ fromType => 'deals', fromId => "$rm_d", toType => 'contacts', toId => "$add_d_contact" });
admin($F, 'DELETE', "records/contacts/$arch_c");

# Arrival of each change, timed from the change.
my %checks = (
	'new primary company' => "EXISTS (SELECT 1 FROM crm.contacts_companies WHERE id = '$move_c:$new_primary:1')",
	'old primary label gone' => "NOT EXISTS (SELECT 1 FROM crm.contacts_companies WHERE id = '$move_c:$old_primary:1')",
	'labelled association added' => "EXISTS (SELECT 1 FROM crm.contacts_companies WHERE id = '$add_c:$add_company:101')",
	'association removed' => "NOT EXISTS (SELECT 1 FROM crm.contacts_companies WHERE from_id = $rm_c AND to_id = $rm_company)",
	'deal contact removed' => "NOT EXISTS (SELECT 1 FROM crm.deals_contacts WHERE id = '$rm_d:$rm_d_contact:3')",
	'deal contact added' => "EXISTS (SELECT 1 FROM crm.deals_contacts WHERE id = '$rm_d:$add_d_contact:3')",
	'archived contact gone' => "NOT EXISTS (SELECT 1 FROM crm.contacts_companies WHERE from_id = $arch_c) "
	  . "AND NOT EXISTS (SELECT 1 FROM crm.deals_contacts WHERE to_id = $arch_c)");
my @names = sort keys %checks;
my %arrived;
wait_until(120, sub {
	my @r = split /\|/, sql('SELECT ' . join(', ', map { $checks{$_} } @names));
	for my $i (0 .. $#names)
	{
		$arrived{ $names[$i] } //= time - $t0 if ($r[$i] // '') eq 't';
	}
	return scalar(keys %arrived) == scalar(@names);
});
my $bound = (scalar(@contacts) / 100 * 2) / $rps * 3 + 30;
for my $name (@names)
{
	ok(defined $arrived{$name}, "change arrived: $name");
}
my ($lag) = sort { $b <=> $a } map { $arrived{$_} // 999 } @names;
note(join(', ', map { sprintf('%s %.1fs', $_, $arrived{$_} // -1) } @names));
note(sprintf('association lag (change -> table, slowest of %d changes): %.1fs; bound %.0fs', scalar(@names), $lag, $bound));
cmp_ok($lag, '<', $bound, sprintf('association lag %.1fs is below %.0fs', $lag, $bound));

my $cc_new = truth($F, 'contacts', 'companies');
my $dc_new = truth($F, 'deals', 'contacts');
{
	# The fake did what we meant: the changes are visible in its truth.
	ok(!$cc_new->{"$move_c:$old_primary:1"} && $cc_new->{"$move_c:$old_primary:279"}
		  && $cc_new->{"$move_c:$new_primary:1"} && $cc_new->{"$move_c:$new_primary:279"},
		"fake: contact ${move_c}'s primary company moved from $old_primary to $new_primary");
	ok($cc_new->{"$add_c:$add_company:101"} && ($cc_new->{"$add_c:$add_company:101"}{label} // '') eq 'Former employee',
		"fake: contact $add_c has a 'Former employee' association");
	ok(!grep({ /^$rm_c:$rm_company:/ } keys %$cc_new), "fake: contact $rm_c lost company $rm_company");
	ok(!$dc_new->{"$rm_d:$rm_d_contact:3"} && $dc_new->{"$rm_d:$add_d_contact:3"}, "fake: deal ${rm_d}'s contacts changed");
	ok(!grep({ $_->{from_id} == $arch_c } values %$cc_new) && !grep({ $_->{to_id} == $arch_c } values %$dc_new),
		"fake: archived contact $arch_c has no associations left");
}
my %gone = (
	'contacts/companies' => scalar(grep { !$cc_new->{$_} } keys %$cc_truth),
	'deals/contacts' => scalar(grep { !$dc_new->{$_} } keys %$dc_truth));
cmp_ok($gone{'contacts/companies'}, '>=', 4, "contacts/companies: $gone{'contacts/companies'} rows to delete");
cmp_ok($gone{'deals/contacts'}, '>=', 2, "deals/contacts: $gone{'deals/contacts'} rows to delete");

ok(wait_full_walk('contacts/companies', $t_change), 'contacts/companies: a full walk began and ended after the changes');
ok(wait_full_walk('deals/contacts', $t_change), 'deals/contacts: a full walk began and ended after the changes');
compare_assoc('contacts/companies after the changes', 'crm.contacts_companies', $cc_new);
compare_assoc('deals/contacts after the changes', 'crm.deals_contacts', $dc_new);
for my $c ('contacts/companies', 'deals/contacts')
{
	is(status_of('crm', $c)->{records_deleted}, $gone{$c}, "$c: records_deleted counts the $gone{$c} rows removed");
}
# Re-walking unchanged associations must not rewrite rows: only the first walk and the
# added associations count as upserts.
is(status_of('crm', 'contacts/companies')->{records_upserted}, scalar(keys %$cc_truth) + scalar(grep { !$cc_truth->{$_} } keys %$cc_new),
	'contacts/companies: records_upserted = first walk + added rows (unchanged rows are not rewritten)');
is(status_of('crm', 'deals/contacts')->{records_upserted}, scalar(keys %$dc_truth) + scalar(grep { !$dc_truth->{$_} } keys %$dc_new),
	'deals/contacts: records_upserted = first walk + added rows');
note('section 2 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 3. Status of the association collections
# ---------------------------------------------------------------------------

for my $c ('contacts/companies', 'deals/contacts')
{
	my $st = status_of('crm', $c);
	is($st->{state}, 'syncing', "$c: state syncing");
	is($st->{phase}, 'incremental', "$c: phase incremental");
	ok(defined $st->{last_sweep_at}, "$c: last_sweep_at set");
	ok(defined $st->{backfill_completed_at}, "$c: backfill_completed_at set");
	ok(!defined $st->{last_error}, "$c: no error recorded") or diag($st->{last_error});
	cmp_ok($st->{requests} // 0, '>', 0, "$c: requests counted");
}
is(status_of('crm', 'contacts/companies')->{target_table}, 'crm.contacts_companies', 'status: target table');
# Walks keep going: last_sweep_at moves on without any change.
{
	my $before = status_of('crm', 'contacts/companies')->{last_sweep_at};
	ok(wait_sql(60, "SELECT last_sweep_at > '$before' FROM sync.status WHERE source = 'crm' AND collection = 'contacts/companies'"),
		'contacts/companies: walks repeat (last_sweep_at advances)');
	my $w = sql("SELECT extract(epoch FROM now() - last_sweep_at) FROM sync.status WHERE source = 'crm' AND collection = 'contacts/companies'");
	note(sprintf('now - last_sweep_at = %.1fs', $w));
}
compare_assoc('contacts/companies after more walks', 'crm.contacts_companies', $cc_new);
is(status_of('crm', 'contacts/companies')->{records_deleted}, $gone{'contacts/companies'},
	'contacts/companies: unchanged walks delete nothing more');

# ---------------------------------------------------------------------------
# 4. Malformed association collections fail at call time
# ---------------------------------------------------------------------------

{
	my $n = sql('SELECT count(*) FROM sync.collections');
	my ($ret, $out, $err) = $node->psql('postgres', "SELECT sync.add_collection('crm', 'contacts/nonsense')");
	isnt($ret, 0, "add_collection('contacts/nonsense') fails");
	like($err, qr/HubSpot has no object type "nonsense"/, 'the error names the unknown type');
	($ret, $out, $err) = $node->psql('postgres', "SELECT sync.add_collection('crm', 'nonsense/contacts')");
	isnt($ret, 0, "add_collection('nonsense/contacts') fails");
	like($err, qr/HubSpot has no object type "nonsense"/, 'the error names the unknown from type');
	($ret, $out, $err) = $node->psql('postgres', "SELECT sync.add_collection('crm', 'contacts/')");
	isnt($ret, 0, "add_collection('contacts/') fails");
	like($err, qr/invalid HubSpot association collection "contacts\/"/, 'the error calls it an invalid association collection');
	is(sql('SELECT count(*) FROM sync.collections'), $n, 'no collection was added by the failed calls');
	is(sql("SELECT to_regclass('crm.contacts_nonsense') IS NULL AND to_regclass('crm.nonsense_contacts') IS NULL "
		  . "AND to_regclass('crm.contacts_') IS NULL AND to_regclass('crm.contacts') IS NULL"), 't',
		'no table was created by the failed calls');
}

note('total ' . elapsed());
$node->stop;
done_testing();
